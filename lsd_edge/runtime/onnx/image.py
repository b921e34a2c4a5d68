"""Pixel values without transformers: a saved image-processor config applied with PIL and numpy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lsd_edge.errors import RuntimeModelError
from lsd_edge.runtime.onnx.layout import read_json_file


@dataclass
class ImagePreprocessor:
    """The saved image-processor config applied with PIL + numpy, step for step as transformers' PIL backend:
    RGB (alpha over white), resize, center crop, rescale (in float64, then float32), normalize, CHW."""

    size: dict
    resample: int = 3
    do_resize: bool = True
    do_center_crop: bool = False
    crop_size: dict | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_folder(cls, folder: Path) -> ImagePreprocessor:
        if (folder / "processor_config.json").is_file():
            cfg = read_json_file(folder / "processor_config.json", "processor config").get("image_processor")
        else:
            cfg = None
        if cfg is None and (folder / "preprocessor_config.json").is_file():
            cfg = read_json_file(folder / "preprocessor_config.json", "image processor config")
        if not cfg:
            raise RuntimeModelError(
                f"{folder}: no image processor config (processor_config.json); re-run `lsd-edge export`"
            )
        size = cfg.get("size") or {}
        if not (("height" in size and "width" in size) or "shortest_edge" in size):
            raise RuntimeModelError(
                f"{folder}: image processor size {size} is not supported; give height and width or shortest_edge"
            )

        def triple(v, default):
            v = default if v is None else v
            return tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v, v, v]))

        return cls(
            size=size,
            resample=int(cfg.get("resample", 3)),
            do_resize=cfg.get("do_resize", True),
            do_center_crop=bool(cfg.get("do_center_crop", False)),
            crop_size=cfg.get("crop_size"),
            do_rescale=cfg.get("do_rescale", True),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            do_normalize=cfg.get("do_normalize", True),
            image_mean=triple(cfg.get("image_mean"), 0.5),
            image_std=triple(cfg.get("image_std"), 0.5),
        )

    def _target(self, h: int, w: int) -> tuple[int, int]:
        if "height" in self.size:
            return int(self.size["height"]), int(self.size["width"])
        s = int(self.size["shortest_edge"])
        if w <= h:
            return int(s * h / w), s
        return s, int(s * w / h)

    def __call__(self, image) -> np.ndarray:
        """One PIL image -> pixel values (1, 3, H, W) float32."""
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        image = image.convert("RGB")
        if self.do_resize:
            h, w = self._target(image.height, image.width)
            image = image.resize((w, h), resample=Image.Resampling(self.resample))
        x = np.asarray(image).transpose(2, 0, 1)  # (3, H, W) uint8
        if self.do_center_crop and self.crop_size:
            x = _center_crop(x, int(self.crop_size["height"]), int(self.crop_size["width"]))
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if self.do_normalize:
            mean = np.array(self.image_mean, dtype=np.float32)
            std = np.array(self.image_std, dtype=np.float32)
            x = ((x.T - mean) / std).T
        return np.ascontiguousarray(x[None], dtype=np.float32)


def _center_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """(C, H, W) -> (C, ch, cw), zero-padded where the image is smaller, as transformers does."""
    _, h, w = x.shape
    nh, nw = max(ch, h), max(cw, w)
    canvas = np.zeros(x.shape[:-2] + (nh, nw), dtype=x.dtype)
    tp, lp = -(-(nh - h) // 2), -(-(nw - w) // 2)
    canvas[..., tp : tp + h, lp : lp + w] = x
    top, left = (h - ch) // 2 + tp, (w - cw) // 2 + lp
    return canvas[..., max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]
