"""The learning-rate schedule is a pure function of the step: warmup, then cosine / WSD / constant."""
import pytest

from configs.schema import OptimConfig
from training.optim import lr_at


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_then_schedule(schedule):
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule=schedule, decay_fraction=0.2)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    if schedule == "constant":
        assert all(lr == 1.0 for lr in lrs[10:])
    else:
        assert lrs[-1] == pytest.approx(0.1, abs=0.02) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    if schedule == "wsd":
        assert all(lr == 1.0 for lr in lrs[10:80]) and lrs[90] < 1.0
