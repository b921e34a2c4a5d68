"""How teacher and student see the same sample: whether a stage needs the teacher's own view of its
data (`teacher_view`), each one's patch grid (`visual_grid`) and, where their tokenizers differ, how
their vocabularies meet (`vocab_map`), from their processors.

A student whose tower sees at another resolution, or through another tower, reads other pixels and
(at another resolution or patch) another number of visual tokens than its teacher (METHOD.md, "edge
vision"); distilling stages then feed the teacher its own view, and pool its targets from its grid
onto the student's (`lsd_edge.distill.grid`). A student with another tokenizer is distilled across
the two vocabularies (`lsd_edge.distill.cross_vocab`): the teacher reads each record in its own
tokens, and what needs one token sequence for both (layer-latent pairs, a teacher cache) is refused.
"""

from __future__ import annotations

from lsd_edge.data.chat import ChatEncoder
from lsd_edge.data.dataset import TeacherView
from lsd_edge.distill.cross_vocab import VocabMap
from lsd_edge.distill.grid import GridMap
from lsd_edge.errors import LsdEdgeError, RecipeError
from lsd_edge.models.load import load_tokenizer
from lsd_edge.models.tokens import (
    num_image_tokens,
    processor_image_size,
    same_vocabulary,
    shares_vocabulary,
)
from lsd_edge.recipe.schema import Recipe, StageConfig


def teacher_view(teacher_processor, student_processor) -> TeacherView | None:
    """The teacher's view of a student's samples, or None where it reads the same pixels and tokens;
    with its own chat encoder where its tokenizer differs (it reads each record in its own tokens)."""
    if student_processor is teacher_processor:
        return None
    kt, ks = num_image_tokens(teacher_processor), num_image_tokens(student_processor)
    same = teacher_processor.image_processor.to_dict() == student_processor.image_processor.to_dict()
    one_vocab = same_vocabulary(teacher_processor.tokenizer, student_processor.tokenizer)
    if same and kt == ks and one_vocab:
        return None
    encoder = None if one_vocab else ChatEncoder(teacher_processor)
    return TeacherView(teacher_processor.image_processor, kt, encoder)


def vocab_map(teacher_processor, student_processor, stage: StageConfig) -> VocabMap | None:
    """How the teacher's vocabulary meets the student's for a distilling stage (`loss.cross_tokenizer`),
    or None where they have one vocabulary; a stage that needs one token sequence for both is refused."""
    if same_vocabulary(teacher_processor.tokenizer, student_processor.tokenizer):
        return None
    check_cross_tokenizer(stage, stage.cached)
    return VocabMap.between(
        teacher_processor.tokenizer, student_processor.tokenizer, stage.loss.cross_tokenizer
    )


def own_tokenizer_differs(recipe: Recipe) -> bool:
    """Whether a tiny student's own tokenizer surely differs from the teacher's: word-level, a BPE of
    another size, or any under a loaded teacher."""
    s = recipe.student
    other = s.tokenizer == "word" or s.tokenizer_vocab is not None or recipe.teacher.tiny is None
    return s.tokenizer is not None and other


def llm_tokenizer_differs(recipe: Recipe) -> bool:
    """Whether a `student.llm`'s tokenizer lacks the vocabulary of the `teacher.path` checkpoint's (the
    student then speaks through its own, `lsd_edge.models.build.llm_processor`); False where either
    cannot be read here (a hub id not in the local cache, a teacher the recipe trains)."""
    r = recipe
    if r.student.llm is None or r.teacher.path is None:
        return False
    try:
        llm = load_tokenizer(r.student.llm, "student.llm", r.student.trust_remote_code)
        teacher = load_tokenizer(r.teacher.path, "teacher.path", r.teacher.trust_remote_code)
    except LsdEdgeError:
        return False
    return not shares_vocabulary(llm, teacher)


def tokenizer_problems(recipe: Recipe) -> list[str]:
    """What `distill` refuses of a student that reads its samples in other tokens than its teacher, as
    far as the recipe and the tokenizer files tell before any model loads (`lsd-edge validate`): each
    distilling stage that needs one tokenization, under the key to change."""
    if not (own_tokenizer_differs(recipe) or llm_tokenizer_differs(recipe)):
        return []
    problems = []
    for i, st in enumerate(recipe.stages):
        problem = st.one_tokenization() if st.distills else None
        if problem:
            problems.append(f"stages[{i}]: the student's tokenizer differs from the teacher's, so {problem}")
    return problems


def check_tokenizers_early(recipe: Recipe, stages: list[StageConfig]) -> None:
    """Before the teacher loads (or trains): a student tokenizer that surely differs from the teacher's
    (a tiny student's own, a `student.llm`'s read from its files) refuses the first stage that needs
    one tokenization (`vocab_map` checks every other case once both are built)."""
    if own_tokenizer_differs(recipe) or llm_tokenizer_differs(recipe):
        for st in stages:
            if st.distills:
                check_cross_tokenizer(st, st.cached)


def check_cross_tokenizer(stage: StageConfig, cached: bool) -> None:
    """What cannot work with two tokenizations of one sample, refused in one line: a teacher cache
    (`cached`: the stage distils from one, or one is being made for it), layer latent pairs."""
    problem = stage.one_tokenization(cached)
    if problem:
        raise LsdEdgeError(
            f"stage '{stage.name}': the student's tokenizer differs from the teacher's, so {problem}"
        )


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
