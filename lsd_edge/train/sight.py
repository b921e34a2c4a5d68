"""How teacher and student see the same image: whether a stage needs the teacher's own view of its
data (`teacher_view`) and each one's patch grid (`visual_grid`), from their processors.

A student whose tower sees at another resolution, or through another tower, reads other pixels and
(at another resolution or patch) another number of visual tokens than its teacher (METHOD.md, "edge
vision"); distilling stages then feed the teacher its own view, and pool its targets from its grid
onto the student's (`lsd_edge.distill.grid`).
"""

from __future__ import annotations

from lsd_edge.data.dataset import TeacherView
from lsd_edge.distill.grid import GridMap
from lsd_edge.errors import RecipeError
from lsd_edge.models.tokens import num_image_tokens, processor_image_size


def teacher_view(teacher_processor, student_processor) -> TeacherView | None:
    """The teacher's view of a student's samples, or None where it reads the same pixels and tokens."""
    if student_processor is teacher_processor:
        return None
    kt, ks = num_image_tokens(teacher_processor), num_image_tokens(student_processor)
    same = teacher_processor.image_processor.to_dict() == student_processor.image_processor.to_dict()
    return None if same and kt == ks else TeacherView(teacher_processor.image_processor, kt)


def same_grid(teacher_processor, student_processor) -> bool:
    """Whether both see an image as the same patch grid (the same size, patch and visual tokens)."""
    tp, sp = teacher_processor, student_processor
    return (processor_image_size(tp), tp.patch_size, num_image_tokens(tp)) == (
        processor_image_size(sp),
        sp.patch_size,
        num_image_tokens(sp),
    )


def grid_map(teacher_processor, student_processor, temperature: float) -> GridMap | None:
    """The map of the teacher's visual positions onto the student's, at a stage's temperature over
    the tokenizer's rows; None where both see the same grid."""
    if same_grid(teacher_processor, student_processor):
        return None
    return GridMap.between(
        visual_grid(teacher_processor, "the teacher"),
        visual_grid(student_processor, "the student"),
        temperature,
        len(teacher_processor.tokenizer),
    )


def visual_grid(processor, who: str) -> tuple[int, int]:
    """(rows, columns) of the patch grid whose cells are the processor's visual tokens, one per cell;
    a tower whose tokens are not one per patch (a CLIP tower read with its CLS token) has none."""
    h, w = processor_image_size(processor)
    grid = (h // processor.patch_size, w // processor.patch_size)
    n = num_image_tokens(processor)
    if n != grid[0] * grid[1]:
        raise RecipeError(
            "student",
            [
                f"{who} gives {n} visual tokens for a {grid[0]}x{grid[1]} patch grid, so its tokens cannot be "
                "mapped onto another grid; read its tower without the CLS token "
                "(vision_feature_select_strategy = 'default') or give both models the same grid"
            ],
        )
    return grid
