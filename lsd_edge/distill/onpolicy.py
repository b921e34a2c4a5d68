"""On-policy distilled fine-tuning (GKD: Agarwal et al., 2024): some micro-batches' answers are the
student's own, written at train time, and the teacher's distributions on them are the targets.

It is regeneration (`lsd_edge.distill.regenerate`, LLaVADI) done by the student, per micro-batch:
each assistant turn is answered by the student given the conversation so far with its own earlier
answers, through the one decode loop (`TorchRunner.generate_ids`: greedy at temperature 0, else
sampled), and the conversation is rewritten with those answers and encoded by the data set's own code
(`LlavaDataset.rewritten`), so
truncation, labels and the teacher's view of an edge student hold as for any sample. The rewritten
sample is marked as the student's (`Encoded.own`): its answer positions feed the KL terms and carry
no CE label (`Batch.ce_labels`, `Counts.labelled`).

Every draw is seeded from (run seed, stage index, step, micro-batch index within the step), never
from a global RNG, so a resumed run, or the same run on another number of processes, writes the same
answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lsd_edge.data.batch import Batch, Encoded, collate
from lsd_edge.data.dataset import LlavaDataset
from lsd_edge.data.questions import n_images
from lsd_edge.data.records import BadSample, parse_record
from lsd_edge.recipe.distill import OnPolicyConfig
from lsd_edge.runtime.textgen import SamplingParams
from lsd_edge.runtime.torch_runner import TorchRunner


def slot_rng(seed: int, stage_index: int, step: int, slot: int) -> np.random.Generator:
    """The generator of one micro-batch's draws: a pure function of where it is in the run."""
    return np.random.default_rng([seed % 2**32, stage_index, step, slot])


@dataclass
class Rollout:
    """Writes the student's answers into a stage's micro-batches, with probability `settings.lmbda`
    each. `model` is the student as it trains (generation runs it in eval mode, without a graph)."""

    model: torch.nn.Module
    processor: object
    dataset: LlavaDataset
    settings: OnPolicyConfig
    seed: int
    stage_index: int
    device: torch.device

    def __post_init__(self):
        was_training = self.model.training
        self.runner = TorchRunner.from_model(self.model, self.processor, "student", str(self.device))
        self.model.train(was_training)
        self.pad_id = self.processor.tokenizer.pad_token_id

    def draws(self, step: int, slot: int) -> tuple[bool, np.random.Generator]:
        """Whether micro-batch `slot` of `step` is on-policy, and the generator of its samples."""
        rng = slot_rng(self.seed, self.stage_index, step, slot)
        return bool(rng.random() < self.settings.lmbda), rng

    def apply(self, slots: list[Batch | None], step: int, slot_ids: list[int | None]) -> list[Batch | None]:
        """This process's micro-batches of `step` (global micro-batch indices `slot_ids`), those drawn
        on-policy rewritten with the student's answers."""
        out = []
        for b, k in zip(slots, slot_ids, strict=True):
            if b is not None and k is not None:
                on, rng = self.draws(step, k)
                if on:
                    b = self.rewrite(b, rng).to(self.device)
            out.append(b)
        return out

    def rewrite(self, batch: Batch, rng: np.random.Generator) -> Batch:
        """`batch`'s samples, in order, with the student's answers (on this process's CPU)."""
        was_training = self.model.training
        self.model.eval()
        try:
            samples = [self.own_sample(i, rng) for i in batch.indices]
        finally:
            self.model.train(was_training)
        return collate(samples, self.pad_id, self.dataset.encoder.image_id)

    def own_sample(self, index: int, rng: np.random.Generator) -> Encoded:
        """Sample `index` with every answer the stage reads written by the student; the data's own
        sample where the rewritten one cannot be used (no answer left within max_length)."""
        messages, files = parse_record(self.dataset.records[index], self.dataset.max_turns)
        self.answer(messages, self.dataset.pixels(files), rng)
        try:
            sample = self.dataset.rewritten(index, messages, files)
        except BadSample:
            return self.dataset[index]
        sample.own = True
        return sample

    def answer(self, messages: list[dict], pixels: list[torch.Tensor], rng: np.random.Generator) -> list[str]:
        """Each assistant turn of `messages` replaced by the student's answer, given its own earlier
        ones (in place); returns the answers."""
        encoder, out = self.dataset.encoder, []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = messages[:i]
            ids = encoder.encode_prompt(prompt)
            if len(ids) >= self.dataset.max_length:  # the rest of the sample is cut off anyway
                break
            k = n_images(prompt)
            px = torch.stack(pixels[:k]).to(self.device, self.model.dtype) if k else None
            sampling = SamplingParams(
                do_sample=self.settings.temperature > 0,
                temperature=self.settings.temperature or 1.0,
                seed=int(rng.integers(2**63)),
            )
            text = self.runner.generate_ids(ids, px, self.settings.max_new_tokens, sampling=sampling).text
            text = text.strip()
            messages[i] = {"role": "assistant", "content": [{"type": "text", "text": text}]}
            out.append(text)
        return out
