"""What a run shows while it goes: a console line and a metrics record per step (loss, lr, grad norm,
tokens/s, MFU on a known GPU, peak memory, ETA), a profiler trace of chosen steps, the loss-curve PNG."""
import math

import pytest
import torch

from training.metrics import StepTimer, peak_flops
from training.plots import smoothed
from tests.training_runs import records, run_train


def test_mfu_uses_the_devices_peak_and_is_absent_on_cpu(monkeypatch):
    assert peak_flops(torch.device("cpu")) is None
    assert "mfu" not in StepTimer(1e9, torch.device("cpu"), 1).step(1.0, 1000, 10)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA B200", 2.25e15), ("NVIDIA L4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_flops(torch.device("cuda", 0)) == peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    # MFU = FLOPs per token x tokens per second / (peak x GPUs).
    record = StepTimer(1e9, torch.device("cuda", 0), 2).step(2.0, 989_000, steps_left=5)
    assert record["mfu"] == pytest.approx(1e9 * 989_000 / 2.0 / (2 * 989e12))
    assert record["peak_mem_gib"] == 3.0 and record["eta_s"] == 10.0


def test_smoothing_follows_the_trend_and_skips_non_finite_losses():
    values = smoothed([4.0, 4.0, float("nan"), 2.0, 2.0])
    assert values[0] == 4.0 and values[2] == 4.0 and 2.0 < values[-1] < 4.0
    assert all(math.isfinite(v) for v in values)


@pytest.mark.slow
def test_a_run_logs_every_figure_profiles_the_chosen_steps_and_draws_its_curve(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train("train.max_steps=4", "train.checkpoint_every=0", "train.log_every=2",
                     "train.profile.steps=[2,3]", "eval.held_out_tokens=300", f"run.dir={run_dir}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all(key in lines[0] for key in ("loss ", "lr ", "grad ", "tok/s", "mem ", "ETA "))
    steps = [r for r in records(run_dir) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for record in steps:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gib", "eta_s", "tokens_seen"} <= set(record)
        assert "mfu" not in record  # CPU: no peak to compare with
    trace = run_dir / "profile" / "rank0_steps2-3.json"
    assert trace.stat().st_size > 1000 and '"traceEvents"' in trace.read_text()
    assert (run_dir / "loss_curve.png").stat().st_size > 10_000
