"""The student as the recipe describes it: tiny sizes, composed from parts, or a LLaVA checkpoint;
checked against the teacher's tokenizer, and put on the run's device in fp32 for training."""

from __future__ import annotations

import torch

from lsd_edge.data.prepare import corpus_texts
from lsd_edge.errors import RecipeError
from lsd_edge.models.build import build_tiny_model, build_tiny_processor, compose_llava, student_processor
from lsd_edge.models.groups import compile_layers
from lsd_edge.models.load import load_llava
from lsd_edge.models.tokens import check_tokenizers, image_tokens
from lsd_edge.recipe.schema import Recipe


def build_student(recipe: Recipe, teacher, teacher_processor, device: torch.device):
    """(model, processor) of the initial student, ready to train (`trainable_student`)."""
    spec = recipe.student
    seed = recipe.run.seed + 1
    if spec.tiny is not None:
        if spec.tiny.vision == "teacher":
            processor = student_processor(teacher_processor, spec)
        else:
            processor = build_tiny_processor(spec.tiny.vision, corpus_texts(recipe))
        model = build_tiny_model(
            spec.tiny,
            processor,
            vision_from=teacher,
            seed=seed,
            image_size=spec.image_size,
            vision_layers=spec.vision_layers,
        )
    elif spec.llm is not None:
        model, processor = compose_llava(spec, teacher, teacher_processor, device="cpu", seed=seed)
    else:
        model, processor = load_llava(
            spec.path, what="student.path", device="cpu", trust_remote_code=spec.trust_remote_code
        )
    check_tokenizers(teacher_processor.tokenizer, processor.tokenizer)
    check_same_grid(teacher.config, model.config)
    return trainable_student(model, recipe, device), processor


def check_same_grid(teacher_config, student_config) -> None:
    """Stages feed teacher and student one batch (one image size, one run of image tokens), so the
    student must see each image as the teacher does until distillation across unequal grids
    (METHOD.md, "edge vision"; its losses are `lsd_edge.distill.grid`'s) is in the stage loop."""
    tv, sv = teacher_config.vision_config, student_config.vision_config
    kt, ks = image_tokens(teacher_config), image_tokens(student_config)
    if (tv.image_size, kt) != (sv.image_size, ks):
        raise RecipeError(
            "student",
            [
                f"it sees a {sv.image_size} px image as {ks} visual tokens, the teacher a "
                f"{tv.image_size} px image as {kt}; training across unequal visual grids is not in the stage "
                "loop yet: keep the teacher's image size and patch grid (student.vision_layers, or a smaller "
                "tower at the teacher's grid, train today); `lsd-edge validate` shows both"
            ],
        )


def trainable_student(model, recipe: Recipe, device: torch.device):
    """The student as stages train it: fp32 weights on the run's device, compiled if asked."""
    model = model.float().to(device)
    if recipe.run.compile:
        compile_layers(model)
    return model
