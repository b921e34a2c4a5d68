"""The recipe's data sections: `[data]` (the data root, the data sets, the sequence length, bad
samples, workers) and `[data.shapes]` (generating ShapesVQA and its variants). Strict and frozen, as
every recipe section is (`lsd_edge.recipe.schema` holds the rest and the whole `Recipe`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from lsd_edge.errors import RecipeError
from lsd_edge.recipe.types import NonNegInt, PositiveInt, Strict


class ShapesConfig(Strict):
    """Generate ShapesVQA into the data root when its files are missing."""

    seed: int = 0
    n_train: PositiveInt = 2000
    n_eval: PositiveInt = 300
    image_size: Annotated[int, Field(ge=16, le=1024)] = 48
    questions_per_image: Annotated[int, Field(ge=1, le=10)] = 4
    # Largest offset of a shape from its cell's centre, in pixels (lsd_edge.data.shapes.JITTER); the
    # quadrants' alone.
    jitter: Annotated[int, Field(ge=0, le=64)] = 1
    # The scenes: "quadrants" (1-4 shapes, one per cell of a 2x2 grid: the embedded default's) or
    # "free" (1-2 shapes at random positions, sizes and rotations; lsd_edge.data.shapes_variants).
    layout: Literal["quadrants", "free"] = "quadrants"
    # Negated questions ("does the image not contain a red shape ?") beside the usual ones.
    negations: bool = False

    # Options added after ShapesVQA format 2: a data root's identity names them only where they are
    # set, so a root made before them stays valid (lsd_edge.data.prepare.shapes_manifest).
    LATER: ClassVar[tuple[str, ...]] = ("layout", "negations")
    # lsd_edge.data.shapes_variants.MIN_FREE_IMAGE_SIZE (the recipe does not import the data layer)
    MIN_FREE_IMAGE_SIZE: ClassVar[int] = 32

    @model_validator(mode="after")
    def _check(self) -> ShapesConfig:
        if self.layout == "free" and self.image_size < self.MIN_FREE_IMAGE_SIZE:
            raise ValueError(
                f"image_size {self.image_size}: the free layout needs at least {self.MIN_FREE_IMAGE_SIZE} px "
                "to tell rotated shapes apart; use e.g. 64"
            )
        return self

    def later_unset(self) -> set[str]:
        """The `LATER` options left at their defaults."""
        return {k for k in self.LATER if getattr(self, k) == type(self).model_fields[k].default}


class DatasetConfig(Strict):
    path: str
    images: str | None = None


class DataConfig(Strict):
    root: str = "."
    shapes: ShapesConfig | None = None
    pretrain: DatasetConfig | None = None
    instruct: DatasetConfig | None = None
    eval: DatasetConfig | None = None
    # Longer conversations are cut here (never inside an image); labels stay on what remains.
    max_length: Annotated[int, Field(ge=8)] = 2048
    # A sample that cannot be used (docs/TRAINING.md lists the reasons) is skipped and counted, or
    # stops the run with its id and reason.
    bad_samples: Literal["skip", "error"] = "skip"
    # DataLoader worker processes per training process that decode and collate micro-batches ahead
    # of the loop; left out: the cores per process less one, at most 8 (lsd_edge.data.loading).
    num_workers: NonNegInt | None = None

    # Settings that leave every result the same: not part of what a made folder is tied to.
    NOT_IDENTITY: ClassVar[tuple[str, ...]] = ("num_workers",)

    def dataset(self, name: str) -> DatasetConfig:
        ds = getattr(self, name, None)
        if ds is None:
            raise RecipeError(
                "recipe", [f"data.{name}: no such data set is configured; add a [data.{name}] section"]
            )
        return ds

    def resolve(self, ds: DatasetConfig) -> tuple[Path, Path | None]:
        root = Path(self.root)
        images = root / ds.images if ds.images is not None else None
        return root / ds.path, images
