"""Resume states: a round trip restores every state exactly, and loading never unpickles code."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lsd_edge.errors import TrainingError
from lsd_edge.train.backends.base import Backend, Prepared
from lsd_edge.train.state import TrainingProgress, has_state


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def _trained():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)  # frozen: not in the state
    groups = [{"params": [model[0].weight], "lr": 1e-2}, {"params": list(model[1].parameters()), "lr": 3e-3}]
    opt = torch.optim.AdamW(groups, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _prepared(model, opt, sched) -> Prepared:
    return Prepared(model, opt, sched, model)


BAD = {"total": 1, "by_reason": {"missing image": 1}, "examples": {"missing image": ["a"]}, "kept": {}}


def _saved(tmp_path):
    model, opt, sched = _trained()
    for _ in range(3):
        model(torch.randn(5, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    TrainingProgress.capture(3, 40, sched, BAD).save(tmp_path, Backend(), _prepared(model, opt, sched))
    return model, opt, sched


def test_a_state_round_trips_weights_optimizer_schedule_and_rngs(tmp_path):
    model, opt, sched = _saved(tmp_path)
    assert has_state(tmp_path) and (tmp_path / "step-0000003" / "weights").is_dir()
    want = _draws()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    loaded, folder = TrainingProgress.load(tmp_path)
    assert (loaded.step, loaded.position, loaded.bad) == (3, 40, BAD)
    model2, opt2, sched2 = _trained()
    loaded.restore(folder, Backend(), _prepared(model2, opt2, sched2))
    assert _draws() == want, "every RNG continues where it was saved"
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"], "learning rates as the schedule left them"
    assert all(torch.equal(a["state"][k][n], b["state"][k][n]) for k in a["state"] for n in a["state"][k])
    assert sched2.last_epoch == 3


def test_a_trainable_weight_that_never_had_a_gradient_resumes_and_steps_as_the_cut_run(tmp_path):
    """AdamW keeps no state for a trainable weight no loss reads (a SigLIP tower's post_layernorm under
    LLaVA's feature layer): the resume state holds none, and the resumed run must load and step as
    the run that was cut did, not refuse the state as damaged."""

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 2), "unread": torch.nn.Linear(3, 2)})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def step(model, opt, sched, seed):
        torch.manual_seed(seed)
        model["used"](torch.randn(4, 3)).square().sum().backward()
        opt.step(), opt.zero_grad(), sched.step()

    model, opt, sched = fresh()
    for i in range(2):
        step(model, opt, sched, i)
    TrainingProgress.capture(2, 8, sched, BAD).save(tmp_path, Backend(), _prepared(model, opt, sched))
    model2, opt2, sched2 = fresh()
    loaded, folder = TrainingProgress.load(tmp_path)
    loaded.restore(folder, Backend(), _prepared(model2, opt2, sched2))
    unread = {id(p) for p in model2["unread"].parameters()}
    assert not any(id(p) in unread for p in opt2.state), "no state made up for the unread weight"
    step(model, opt, sched, 2), step(model2, opt2, sched2, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))


def test_an_unfinished_state_folder_is_ignored(tmp_path):
    _saved(tmp_path)
    (tmp_path / "step-0000003" / "step.json").unlink()  # killed while writing
    assert TrainingProgress.load(tmp_path) is None and not has_state(tmp_path)


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_pickle_in_the_progress_file_is_refused_not_run(tmp_path):
    _saved(tmp_path)
    marker = tmp_path / "ran"
    torch.save({"position": _Planted(marker)}, tmp_path / "step-0000003" / "progress.pt")
    with pytest.raises(TrainingError) as e:
        TrainingProgress.load(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "could run code" in msg and "was not loaded" in msg
    assert not marker.exists(), "nothing in the file was executed"


def test_a_planted_pickle_in_the_checkpoint_metadata_is_refused_not_run(tmp_path):
    import pickle

    _saved(tmp_path)
    marker = tmp_path / "ran"
    (tmp_path / "step-0000003" / "weights" / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    loaded, folder = TrainingProgress.load(tmp_path)
    model2, opt2, sched2 = _trained()
    with pytest.raises(TrainingError) as e:
        loaded.restore(folder, Backend(), _prepared(model2, opt2, sched2))
    msg = str(e.value)
    assert "\n" not in msg and "could run code" in msg, msg
    assert not marker.exists(), "nothing in the file was executed"


def test_a_state_of_the_earlier_format_is_refused_in_one_line(tmp_path):
    """Before distributed checkpoints a step folder held one state.pt: it is named, not half-loaded."""
    folder = tmp_path / "step-0000004"
    folder.mkdir()
    torch.save({"position": 32}, folder / "state.pt")
    (folder / "step.json").write_text('{"step": 4}')
    with pytest.raises(TrainingError) as e:
        TrainingProgress.load(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and f"resume state {folder} is damaged or was written by another run" in msg
    assert "--restart" in msg
