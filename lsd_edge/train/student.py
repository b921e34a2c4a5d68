"""The student as the recipe describes it: tiny sizes, composed from parts, or a LLaVA checkpoint;
checked against the teacher's tokenizer, and put on the run's device in fp32 for training."""

from __future__ import annotations

import torch

from lsd_edge.data.prepare import corpus_texts
from lsd_edge.models.build import (
    build_tiny_model,
    build_tiny_processor,
    compose_llava,
    llm_processor,
    student_processor,
    with_own_tokenizer,
)
from lsd_edge.models.groups import compile_layers
from lsd_edge.models.load import load_llava
from lsd_edge.models.tokens import check_tokenizers
from lsd_edge.recipe.schema import Recipe

# Texts of the data a student's own tokenizer is checked on (`check_tokenizers`) before training.
CHECKED_TEXTS = 2000


def build_student(recipe: Recipe, teacher, teacher_processor, device: torch.device):
    """(model, processor) of the initial student, ready to train (`trainable_student`)."""
    spec = recipe.student
    seed = recipe.run.seed + 1
    if spec.tiny is not None:
        processor = tiny_student_processor(recipe, teacher_processor)
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
    check_tokenizers(teacher_processor, processor, lambda: corpus_texts(recipe)[:CHECKED_TEXTS])
    return trainable_student(model, recipe, device), processor


def tiny_student_processor(recipe: Recipe, teacher_processor):
    """A tiny student's processor: the teacher's (at the student's image size) or a tiny tower's, with
    a tokenizer of its own when the recipe gives one (`student.tokenizer`)."""
    spec = recipe.student
    if spec.tiny.vision == "teacher":
        processor = student_processor(teacher_processor, spec)
    else:
        processor = build_tiny_processor(spec.tiny.vision, corpus_texts(recipe))
    if spec.tokenizer is not None:
        processor = with_own_tokenizer(processor, spec.tokenizer, corpus_texts(recipe), spec.tokenizer_vocab)
    return processor


def student_processor_of(recipe: Recipe, load_teacher, teacher_processor):
    """The processor the recipe's student speaks through, without building the student where the
    recipe says it (the teacher's tower, at the student's image size, or a tiny tower of its own)."""
    spec = recipe.student
    if spec.tiny is not None:
        return tiny_student_processor(recipe, teacher_processor)
    if spec.llm is not None and spec.vision in (None, "teacher"):
        return llm_processor(student_processor(teacher_processor, spec), spec)
    return build_student(recipe, load_teacher(), teacher_processor, torch.device("cpu"))[1]


def trainable_student(model, recipe: Recipe, device: torch.device):
    """The student as stages train it: fp32 weights on the run's device, compiled if asked."""
    model = model.float().to(device)
    if recipe.run.compile:
        compile_layers(model)
    return model
