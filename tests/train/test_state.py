"""Resume states: a round trip restores every state exactly, and loading never unpickles code."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lsd_edge.errors import TrainingError
from lsd_edge.train.state import TrainingProgress, latest_step_state, save_step_state


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_a_state_round_trips_with_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    bad = {"total": 1, "by_reason": {"missing image": 1}, "examples": {"missing image": ["a"]}, "kept": {}}
    TrainingProgress.capture(5, 40, model, None, opt, sched, bad).save(tmp_path)
    want = _draws()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    loaded = TrainingProgress.load(tmp_path)
    assert (loaded.step, loaded.position, loaded.bad) == (5, 40, bad)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    from lsd_edge.data.records import BadSampleLog

    log = BadSampleLog()
    loaded.restore(model, None, opt2, sched2, log, main=True)
    assert _draws() == want, "every RNG continues where it was saved"
    assert sched2.last_epoch == 1 and opt2.state_dict()["state"][0]["step"] == 1
    assert log.counts == {"missing image": 1}


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    save_step_state(tmp_path / "state", 3, {"payload": _Planted(marker)})
    with pytest.raises(TrainingError) as e:
        latest_step_state(tmp_path / "state")
    msg = str(e.value)
    assert "\n" not in msg and "could run code" in msg and "was not loaded" in msg
    assert not marker.exists(), "nothing in the file was executed"
