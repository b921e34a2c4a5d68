"""The student under DeepSpeed ZeRO (stage 2 or 3, from the launch config; `lsd_edge.train.launch`).
Everything that knows DeepSpeed's internals is in this module, and DeepSpeed is imported only here,
inside the functions a DeepSpeed launch calls.

- `Zero.prepare` writes what the recipe decides for the stage into the DeepSpeed config
  (`configure`: micro-batch size, no accumulation of DeepSpeed's own, gradient clipping) and puts
  the student in a DeepSpeed engine; under ZeRO-3 `gather_head` lets it gather the lm_head weight
  for the whole objective (the chunked logit losses read it outside the head's own forward).
- DeepSpeed reduces gradients in buckets whose contents must match on every process, and ZeRO-3
  gathers a module's weights when it is called: so every micro-batch reaches every trainable weight,
  in one order (`ZeroPass`: the vision tower and projector run on a blank image, a latent map on
  what it would have seen, at weight 0, where a micro-batch has nothing for them), and a pad slot
  runs the online teacher as a real micro-batch does.
- `full_weights` gives the trained student's weights whole (ZeRO-3 gathers them).
- `state_dicts` / `load_state`: a resume state in the layout DDP and FSDP2 write (one weight and
  AdamW state per parameter name, `lsd_edge.train.state`), so a ZeRO run resumes on any number of
  processes, under ZeRO, FSDP2, DDP or one process. Each tensor is gathered whole in turn and kept
  by one process (balanced by bytes); each process writes what it kept. Nothing is unpickled, and
  DeepSpeed's own checkpoints (pickles tied to the process count) are not used.
- `check_internals`: the DeepSpeed attributes read here, checked once per stage, so a DeepSpeed
  release that moves them stops a run with one line instead of a resume state written wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lsd_edge.data.batch import Batch
from lsd_edge.distill.forward import Forward, StudentPass, image_features
from lsd_edge.errors import TrainingError
from lsd_edge.recipe.schema import StageConfig
from lsd_edge.train.backends.base import SHARDED_ROLLOUT, Backend, Prepared, StudentStep, rebuilt
from lsd_edge.train.backends.fsdp import shard_decoder_layers

ADAM_STATES = ("exp_avg", "exp_avg_sq")
LOAD_CHUNK_BYTES = 1 << 30  # a resume state is read back this many bytes of tensors at a time
# The DeepSpeed releases this module is tested with (pyproject.toml's `deepspeed` extra says the same).
TESTED = "deepspeed>=0.16,<0.20"


@dataclass
class ZeroForward(Forward):
    blank_features: torch.Tensor | None = None  # (1, K, D): a blank image's, where the batch has none
    blank_tower: torch.Tensor | None = None  # (1, K, Dv): the tower features of that blank image


def blank_image(model, device: torch.device) -> torch.Tensor:
    vc = model.config.vision_config
    return torch.zeros(1, getattr(vc, "num_channels", 3), vc.image_size, vc.image_size, device=device)


class ZeroPass(StudentPass):
    """The student's forward with the image features computed here and put in place of the image
    tokens (what LlavaModel does), so that a micro-batch without images runs the same modules (the
    vision tower and projector on a blank image, at weight 0); a latent map with nothing to align
    runs on the projector's output for that blank image, as it would on a real one."""

    def run(self, model, batch: Batch, hidden_states: bool) -> Forward:
        pixels = batch.pixel_values
        feats, tower = image_features(
            model, pixels if pixels is not None else blank_image(model, batch.input_ids.device)
        )
        embeds = model.model.get_input_embeddings()(batch.input_ids)
        blank = blank_tower = None
        if pixels is None:
            embeds = embeds + feats.sum().to(embeds.dtype) * 0.0  # reached, adds nothing
            blank, feats, blank_tower, tower = feats, None, tower, None
        else:
            mask = batch.visual_mask.unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
        out = model.model(
            inputs_embeds=embeds,
            attention_mask=batch.attention_mask,
            output_hidden_states=hidden_states,
            use_cache=False,
            return_dict=True,
        )
        states = out.hidden_states if hidden_states else None
        return ZeroForward(out.last_hidden_state, states, feats, tower, blank, blank_tower)

    def unused_map(self, proj: nn.Linear, f: Forward) -> torch.Tensor:
        for blank in (getattr(f, "blank_features", None), getattr(f, "blank_tower", None)):
            if blank is not None and blank.shape[-1] == proj.in_features:  # the path a real image takes
                return proj(blank.flatten(0, 1).float()).sum() * 0.0
        x = torch.zeros(1, proj.in_features, device=proj.weight.device, dtype=proj.weight.dtype)
        return proj(x).float().sum() * 0.0


class ZeroStep(StudentStep):
    student_pass = ZeroPass()

    def forward(self, batch, teacher, stage, counts, vocab_rows, lam, weight=1.0):
        total, terms = super().forward(batch, teacher, stage, counts, vocab_rows, lam, weight)
        return total * weight, terms  # every trainable weight was reached (ZeroPass)


class Zero(Backend):
    """DeepSpeed ZeRO-2 (gradients and AdamW states partitioned) or ZeRO-3 (weights too)."""

    pad_runs_teacher = True  # a pad slot runs the graph a real micro-batch runs

    def __init__(self, dist, accelerator, stage: int):
        super().__init__(dist, accelerator)
        self.stage = stage

    def make_step(self, student: nn.Module, latent) -> StudentStep:
        return ZeroStep(student, latent)

    def prepare(self, student, latent, optimizer, scheduler, stage: StageConfig, bf16=False) -> Prepared:
        step = self.make_step(student, latent)
        hidden = student.config.text_config.hidden_size
        configure(
            self.accelerator.state.deepspeed_plugin.deepspeed_config, stage, self.dist.world, hidden, bf16
        )
        module, optimizer, scheduler = self.accelerator.prepare(step, optimizer, scheduler)
        check_internals(module)
        if self.stage == 3:
            gather_head(step)
        return Prepared(module, optimizer, scheduler, step)

    def backward(self, p: Prepared, loss: torch.Tensor, last: bool) -> None:
        """ZeRO reduces its buckets in every backward (it accumulates reduced, partitioned gradients);
        the step's last backward also clips and steps (DeepSpeed's engine does both; the optimizer
        step after it only advances the schedule)."""
        p.module.set_gradient_accumulation_boundary(last)
        p.module.backward(loss * self.dist.world if self.dist.active else loss)
        if last:
            p.module.step()

    def clip(self, p: Prepared, max_norm: float) -> None:
        return  # clipped inside DeepSpeed's step (the stage's max_grad_norm is in its config)

    def state_dicts(self, p: Prepared) -> dict[str, Any]:
        return state_dicts(p.module, self.dist.rank, self.dist.world)

    def load_state(self, p: Prepared, read) -> None:
        load_state(p.module, read)

    def plain_student(self, p: Prepared, device: torch.device) -> nn.Module:
        """Gathered (ZeRO-3), and free of the engine's hooks."""
        student = p.step.student
        return rebuilt(student, full_weights(student), device)

    def generating_student(self, p: Prepared) -> nn.Module:
        if self.stage == 3:
            raise TrainingError(SHARDED_ROLLOUT.format(engine="DeepSpeed ZeRO-3"))
        return p.step.student

    def shard_teacher(self, model: nn.Module) -> int:
        # ZeRO-3's gathers of the student's weights run on the default group: the teacher's on its own
        return shard_decoder_layers(model, own_group=True) if self.stage == 3 and self.dist.active else 0


def check_internals(engine) -> None:
    """The attributes of DeepSpeed's engine and ZeRO optimizer this module reads, present."""
    zero = getattr(engine, "optimizer", None)
    needs = {
        "the engine's optimizer (ZeRO)": zero is not None,
        "the ZeRO optimizer's torch optimizer (.optimizer)": zero is not None and hasattr(zero, "optimizer"),
        "the fp32 partitions (fp32_partitioned_groups_flat or single_partition_of_fp32_groups)": zero
        is not None
        and (
            hasattr(zero, "fp32_partitioned_groups_flat") or hasattr(zero, "single_partition_of_fp32_groups")
        ),
        "the parameter groups (bit16_groups, or fp16_groups and sub_group_to_group_id)": zero is not None
        and (
            bool(getattr(zero, "bit16_groups", None))
            or (hasattr(zero, "fp16_groups") and hasattr(zero, "sub_group_to_group_id"))
        ),
    }
    missing = [what for what, ok in needs.items() if not ok]
    if missing:
        import deepspeed

        raise TrainingError(
            f"DeepSpeed {deepspeed.__version__} no longer has {'; '.join(missing)}, which lsd-edge's "
            f"resume states read; install {TESTED} (the versions it is tested with)"
        )


def configure(
    config: dict[str, Any], stage: StageConfig, world: int, hidden_size: int, bf16: bool = False
) -> None:
    """The stage's settings in the DeepSpeed config: `batch_size` micro-batches that lsd-edge
    accumulates itself (DeepSpeed's accumulation would scale the loss by its own count), and the
    stage's gradient clipping (DeepSpeed clips inside its step); ZeRO's 'auto' sizes as HF Trainer
    fills them from the LLM's hidden size. `bf16`: the run's bf16 autocast (run.precision on CUDA),
    which DeepSpeed's engine would switch off inside its forward unless its config names it;
    gradients are still reduced in fp32 (no module is listed as lower-precision safe)."""
    config.update(
        train_micro_batch_size_per_gpu=stage.batch_size,
        gradient_accumulation_steps=1,
        train_batch_size=stage.batch_size * world,
        gradient_clipping=float(stage.max_grad_norm),
        zero_allow_untested_optimizer=True,
        torch_autocast={"enabled": bf16, "dtype": "bfloat16", "lower_precision_safe_modules": []},
    )
    zero = config.setdefault("zero_optimization", {})
    auto = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in auto.items():
        if zero.get(key) == "auto":
            zero[key] = value


def gather_head(step: nn.Module) -> None:
    """ZeRO-3: gather the lm_head weight for the objective's forward and backward."""
    import deepspeed

    deepspeed.zero.register_external_parameter(step, step.student.lm_head.weight)


def full_weights(student: nn.Module) -> dict[str, torch.Tensor]:
    """The student's weights whole, on every process (gathered under ZeRO-3)."""
    import deepspeed

    params = list(student.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {n: p.detach().clone() for n, p in student.named_parameters()}


def _inner(engine):
    return engine.optimizer.optimizer  # DeepSpeedEngine -> ZeRO optimizer -> the torch AdamW


def _flats(engine) -> list[torch.Tensor]:
    """The flat fp32 partitions the torch AdamW steps (its state is keyed by them)."""
    zero = engine.optimizer
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    return list(flats if flats is not None else zero.single_partition_of_fp32_groups)  # ZeRO-2


def _trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _groups(engine) -> list[dict[str, Any]]:
    """The torch optimizer's param_groups as `get_state_dict` writes them: hyperparameters and the
    names of the group's parameters (ZeRO holds them as one flat partition per group)."""
    zero = engine.optimizer
    groups = _inner(engine).param_groups
    members: list[list[nn.Parameter]] = [[] for _ in groups]
    if getattr(zero, "bit16_groups", None):  # ZeRO-2: one list per group
        for i, params in enumerate(zero.bit16_groups):
            members[i].extend(params)
    else:  # ZeRO-3: a group is split into sub-groups of at most sub_group_size elements
        for i, params in enumerate(zero.fp16_groups):
            members[zero.sub_group_to_group_id[i]].extend(params)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    out = []
    for group, params in zip(groups, members, strict=True):
        entry = {k: v for k, v in group.items() if k != "params"}
        entry["params"] = [names[id(p)] for p in params]
        out.append(entry)
    return out


def _step_count(engine) -> torch.Tensor:
    inner = _inner(engine)
    for flat in _flats(engine):
        if "step" in inner.state.get(flat, {}):
            return torch.as_tensor(inner.state[flat]["step"]).detach().cpu().clone()
    return torch.tensor(0.0)


def owners(sizes: list[int], world: int) -> list[int]:
    """Which process keeps each tensor: the least loaded so far, largest tensors first."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = min(range(world), key=load.__getitem__)
        owner[i] = r
        load[r] += sizes[i]
    return owner


def state_dicts(engine, rank: int, world: int) -> dict[str, Any]:
    """This process's part of the resume state: {"model": ..., "optim": ...} with the weights and
    AdamW states of the parameters it keeps (every process takes part in each tensor's gather)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    module = engine.module  # the StudentStep: its parameter names are DDP's
    params = _trainable(module)
    owner = owners([_numel(p) for _, p in params], world)
    step = _step_count(engine)
    model: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    aliases: dict[int, list[str]] = {}  # a tied weight is in a model state dict under each name
    for n, q in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(q), []).append(n)
    for (name, p), r in zip(params, owner, strict=True):
        full = {"weight": safe_get_full_fp32_param(p)}
        for key in ADAM_STATES:
            full[key] = safe_get_full_optimizer_state(p, key)
        if r == rank:
            weight = full["weight"].cpu()
            model.update({alias: weight for alias in aliases[id(p)]})
            state[name] = {"step": step.clone(), **{k: full[k].cpu() for k in ADAM_STATES}}
    optim: dict[str, Any] = {"state": state}
    if rank == 0:
        optim["param_groups"] = _groups(engine)
    return {"model": model, "optim": optim}


def _init_adam_state(engine) -> None:
    """AdamW makes its states at its first step; a resume sets them before that."""
    inner = _inner(engine)
    for flat in _flats(engine):
        state = inner.state[flat]
        state.setdefault("step", torch.tensor(0.0))
        for key in ADAM_STATES:
            state.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-2 links each weight to its slice of those states once they exist
        link()


def _chunks(params: list[tuple[str, nn.Parameter]]) -> list[list[tuple[str, nn.Parameter]]]:
    out, size = [[]], 0
    for name, p in params:
        n = _numel(p) * 4 * (1 + len(ADAM_STATES))
        if out[-1] and size + n > LOAD_CHUNK_BYTES:
            out.append([])
            size = 0
        out[-1].append((name, p))
        size += n
    return out


def _shape(p: nn.Parameter) -> torch.Size:
    """A weight's full shape (ZeRO-3 keeps only a partition in the parameter itself)."""
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def _numel(p: nn.Parameter) -> int:
    return _shape(p).numel()


def _put(p: nn.Parameter, weight: torch.Tensor, states: dict[str, torch.Tensor]) -> None:
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    device = _device(p)
    safe_set_full_fp32_param(p, weight.to(device))
    for key in ADAM_STATES:
        safe_set_full_optimizer_state(p, states[key].to(device), key)
    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):  # the weight the forward uses
        with torch.no_grad():
            p.data.copy_(weight.to(p.device, p.dtype).view_as(p.data))


def _device(p: nn.Parameter) -> torch.device:
    ds = getattr(p, "ds_tensor", None)
    return (ds if ds is not None else p).device


def load_state(engine, read) -> None:
    """Put a resume state back: `read(template)` fills a template of {"model", "optim"} from the
    checkpoint; it is called once per chunk of parameters, so no process holds the whole state."""
    _init_adam_state(engine)
    groups_done = False
    step = torch.tensor(0.0)
    for chunk in _chunks(_trainable(engine.module)):
        model = {n: torch.empty(_shape(p), dtype=torch.float32) for n, p in chunk}
        state = {
            n: {"step": torch.tensor(0.0), **{k: torch.empty_like(model[n]) for k in ADAM_STATES}}
            for n, _ in chunk
        }
        template = {"model": model, "optim": {"state": state}}
        if not groups_done:
            template["optim"]["param_groups"] = _groups(engine)
        read(template)
        if not groups_done:
            _set_hyperparameters(engine, template["optim"]["param_groups"])
            groups_done = True
        for n, p in chunk:
            _put(p, model[n], state[n])
            step = state[n]["step"]
    inner = _inner(engine)
    for flat in _flats(engine):
        inner.state[flat]["step"] = step.clone().to(inner.state[flat]["step"].device)


def _set_hyperparameters(engine, saved: list[dict[str, Any]]) -> None:
    for group, old in zip(_inner(engine).param_groups, saved, strict=True):
        group.update({k: v for k, v in old.items() if k != "params"})
