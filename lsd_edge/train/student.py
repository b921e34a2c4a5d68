"""The student as the recipe describes it: tiny sizes, composed from parts, or a LLaVA checkpoint;
checked against the teacher's tokenizer, and put on the run's device in fp32 for training."""

from __future__ import annotations

import torch

from lsd_edge.data.prepare import corpus_texts
from lsd_edge.models.build import build_tiny_model, build_tiny_processor, compose_llava, student_processor
from lsd_edge.models.groups import compile_layers
from lsd_edge.models.load import load_llava
from lsd_edge.models.tokens import check_tokenizers
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
    return trainable_student(model, recipe, device), processor


def student_processor_of(recipe: Recipe, load_teacher, teacher_processor):
    """The processor the recipe's student speaks through, without building the student where the
    recipe says it (the teacher's tower, at the student's image size, or a tiny tower of its own)."""
    spec = recipe.student
    vision = spec.tiny.vision if spec.tiny is not None else spec.vision
    if spec.tiny is not None and vision != "teacher":
        return build_tiny_processor(vision, corpus_texts(recipe))
    if (spec.tiny is not None or spec.llm is not None) and vision in (None, "teacher"):
        return student_processor(teacher_processor, spec)
    return build_student(recipe, load_teacher(), teacher_processor, torch.device("cpu"))[1]


def trainable_student(model, recipe: Recipe, device: torch.device):
    """The student as stages train it: fp32 weights on the run's device, compiled if asked."""
    model = model.float().to(device)
    if recipe.run.compile:
        compile_layers(model)
    return model
