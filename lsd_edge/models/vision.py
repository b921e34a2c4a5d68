"""A student's vision tower when it does not see as the teacher does (METHOD.md, "edge vision").

Three choices, each still a plain SigLIP (or CLIP) tower inside a `LlavaForConditionalGeneration`,
so every export reads it as it reads the teacher's:

- the teacher's tower at a lower resolution (`student.image_size`): its position embeddings are
  resampled once, bicubic on the 2D patch grid, from the teacher's Ht x Wt grid to the student's
  Hs x Ws, and the vision config and the image processor say the new size (the processor resizes
  with Lanczos: see `processor_at`);
- the teacher's tower with fewer layers (`student.vision_layers = N`): its first N encoder layers,
  with the LLaVA feature layer moved with them (`feature_layer_after_cut`);
- another, smaller SigLIP tower: sizes (`[student.tiny.vision]`, `lsd_edge.models.build`) or a
  SigLIP folder (`load_siglip`), whose image processor the student then speaks through.

This module owns the tower's config and weights under those choices and the processor that goes
with them; `lsd_edge.models.build` puts the tower into a student.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoImageProcessor, SiglipVisionModel
from transformers.image_utils import PILImageResampling

from lsd_edge.errors import ModelError, RecipeError
from lsd_edge.models.load import check_ref, first_line
from lsd_edge.recipe.load import vision_choice_problems

# Towers whose position embeddings are one row per patch of a square grid (CLIP adds a CLS row first).
GRID_TOWERS = {"siglip_vision_model": 0, "clip_vision_model": 1}


@dataclass
class Tower:
    """A vision tower as a LLaVA student takes it: the vision config, the LLaVA feature layer and
    select strategy it is read with, and its weights (the tower's state dict; None: fresh)."""

    config: object
    feature_layer: int
    select_strategy: str
    state: dict[str, torch.Tensor] | None

    @staticmethod
    def of(llava) -> Tower:
        """The tower of a LlavaForConditionalGeneration, as that model reads it."""
        c = llava.config
        return Tower(
            c.vision_config,
            c.vision_feature_layer,
            c.vision_feature_select_strategy,
            llava.model.vision_tower.state_dict(),
        )

    @staticmethod
    def of_config(config) -> Tower:
        """The tower a config describes, without weights: a LLaVA's as it reads it, a SigLIP's
        (`SiglipConfig` or `SiglipVisionConfig`) as `load_siglip` reads it."""
        if config.model_type in ("siglip", "siglip_vision_model"):
            vision = copy.deepcopy(getattr(config, "vision_config", config))
            vision.vision_use_head = False
            return Tower(vision, -1, "full", None)
        return Tower(
            config.vision_config, config.vision_feature_layer, config.vision_feature_select_strategy, None
        )


def grid_side(vision_config) -> int:
    """Patches along each side of the square image the tower sees."""
    return vision_config.image_size // vision_config.patch_size


def resample_position_embeddings(weight: torch.Tensor, grid: int, new_grid: int, prefix: int = 0):
    """(prefix + grid^2, D) position embeddings -> (prefix + new_grid^2, D): the grid rows resampled
    bicubically on the 2D grid (align_corners=False, as transformers' own `interpolate_pos_encoding`),
    the `prefix` rows (CLIP's CLS) kept. An equal grid returns the weights untouched, bit for bit."""
    if new_grid == grid:
        return weight.clone()
    head, rows = weight[:prefix], weight[prefix:]
    d = rows.shape[-1]
    # (grid^2, D) -> (1, D, grid, grid): rows are row-major patches, as the patch embedding flattens them
    g = rows.float().reshape(grid, grid, d).permute(2, 0, 1).unsqueeze(0)
    g = F.interpolate(g, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    rows = g.squeeze(0).permute(1, 2, 0).reshape(new_grid * new_grid, d).to(weight.dtype)
    return torch.cat([head, rows])


def feature_layer_after_cut(layer: int, kept: int) -> int:
    """The LLaVA feature layer of a tower cut to its first `kept` layers.

    LLaVA reads `hidden_states[layer]`, of which a tower of L layers has L + 1 (the embeddings,
    then each layer's output). A negative layer counts from the top and keeps its place among the
    kept layers (-2 stays "second to last"); an absolute one keeps reading the same layer's output,
    clamped to the last kept layer when the cut removed it.
    """
    return layer if layer < 0 else min(layer, kept)


def cut_config(config, feature_layer: int, image_size, vision_layers, where: str = "the tower"):
    """(vision config, feature layer) of a tower at `image_size` px with its first `vision_layers`
    layers (None: as it is); a bad choice is a RecipeError naming the recipe field."""
    tower = (config.image_size, config.patch_size, config.num_hidden_layers, feature_layer)
    problems = vision_choice_problems(image_size, vision_layers, tower, where)
    if image_size is not None and config.model_type not in GRID_TOWERS:
        problems.insert(
            0, f"student.image_size: {where} is a {config.model_type}; only SigLIP and CLIP resample"
        )
    if problems:
        # the recipe's choice does not fit the tower: a recipe problem, found once the tower is read
        raise RecipeError("recipe", problems)
    config = copy.deepcopy(config)
    if image_size is not None:
        config.image_size = image_size
    if vision_layers is not None:
        config.num_hidden_layers = vision_layers
        feature_layer = feature_layer_after_cut(feature_layer, vision_layers)
    return config, feature_layer


def cut_tower(tower: Tower, image_size=None, vision_layers=None, where: str = "the tower") -> Tower:
    """The tower at `image_size` px with its first `vision_layers` layers: the config (`cut_config`),
    the layers past the cut dropped, the position embeddings resampled (`resample_position_embeddings`)."""
    config, layer = cut_config(tower.config, tower.feature_layer, image_size, vision_layers, where)
    state = tower.state
    if state is not None:
        state = {
            k: v
            for k, v in state.items()
            if _layer_index(k) is None or _layer_index(k) < config.num_hidden_layers
        }
        key = next(k for k in state if k.endswith("embeddings.position_embedding.weight"))
        prefix = GRID_TOWERS.get(config.model_type, 0)
        state[key] = resample_position_embeddings(
            state[key], grid_side(tower.config), grid_side(config), prefix
        )
    return Tower(config, layer, tower.select_strategy, state)


def _layer_index(key: str) -> int | None:
    """The encoder layer a tower weight belongs to (`...encoder.layers.<i>....`), None outside them."""
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and i > 0 and parts[i - 1] == "encoder" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def processor_at(processor, image_size: int):
    """A copy of a LLaVA processor whose images are `image_size` px squares (its tokenizer, chat
    template and normalisation unchanged), so it expands `<image>` to the tower's patches.

    It resizes with Lanczos (PIL's antialiased filter), whatever the teacher's processor used: a
    student that sees at a lower resolution downscales every image, and transformers.js in Node
    downscales bicubic or bilinear by sampling points (sharp's `affine`, no antialiasing: 11/255
    mean pixel difference to PIL on a 32 -> 16 px ShapesVQA image) but Lanczos with sharp's
    resampling resize (0.3/255), so the export reads images in Node as training did."""
    processor = copy.deepcopy(processor)
    ip = processor.image_processor
    ip.size = {"height": image_size, "width": image_size}
    ip.resample = PILImageResampling.LANCZOS
    if getattr(ip, "crop_size", None):
        ip.crop_size = {"height": image_size, "width": image_size}
    return processor


def with_image_processor(processor, image_processor, patch_size: int):
    """A copy of a LLaVA processor that prepares images as another tower's `image_processor` does."""
    processor = copy.deepcopy(processor)
    processor.image_processor = image_processor
    processor.patch_size = patch_size
    return processor


def is_siglip_folder(ref: str) -> bool:
    """Whether a hub id or folder holds a SigLIP model (or its vision part) rather than a LLaVA."""
    ref = check_ref(ref, "student.vision")
    try:
        model_type = AutoConfig.from_pretrained(ref).model_type
    except Exception as e:  # an unreadable config is a bad input, reported in one line
        raise ModelError(f"cannot read the config of student.vision '{ref}': {first_line(e)}") from None
    return model_type in ("siglip", "siglip_vision_model")


def load_siglip(ref: str, what: str = "student.vision"):
    """(Tower, image processor) of a SigLIP folder or hub id (`SiglipModel` or `SiglipVisionModel`).

    The tower is read at its last layer with every patch (SigLIP has no CLS token), as SmolVLM
    reads its SigLIP; the pooling head, which LLaVA never uses, is left out."""
    ref = check_ref(ref, what)
    try:
        model = SiglipVisionModel.from_pretrained(ref, dtype=torch.float32, use_safetensors=True)
        image_processor = AutoImageProcessor.from_pretrained(ref)
    except Exception as e:  # any failure to read a user's folder is a bad input, not a crash
        raise ModelError(
            f"cannot load {what} '{ref}': {first_line(e)}; give a local SigLIP folder with safetensors "
            "weights and its preprocessor_config.json"
        ) from None
    config = copy.deepcopy(model.config)
    config.vision_use_head = False
    state = {k: v for k, v in model.state_dict().items() if "head" not in k.split(".")}
    return Tower(config, -1, "full", state), image_processor
