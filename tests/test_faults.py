"""Faults a long run meets: non-finite steps (skipped, counted, and a stop after too many), loss spikes,
a hung rank (the collective timeout names the collective), user errors vs bugs."""
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from configs.errors import CheckpointError, ConfigError, DataError, UserError, run_cli
from configs.schema import load_config
from model import LM
from parallel.engine import Engine
from parallel.topology import Topology
from training.faults import EXIT_DIVERGED, EXIT_TIMEOUT, StepGuard, TrainingDiverged
from tests.training_runs import SMALL, finish, records, run_train, start_train, torchrun, wait_for_step


def test_a_non_finite_gradient_leaves_parameters_and_optimizer_state_untouched():
    cfg, _ = load_config(SMALL)
    torch.manual_seed(0)
    engine = Engine(LM.from_config(cfg.model), cfg.optim, Topology())
    batch = torch.randint(0, 500, (2, 17))
    for _ in range(2):  # a real step first, so the optimizer has state to protect
        engine.backward(F.cross_entropy(engine.model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()))
        engine.step(1e-3)
    params = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    moments = [{k: v.clone() for k, v in s.items()} for s in engine.optimizer.state.values()]

    engine.backward(F.cross_entropy(engine.model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()))
    next(engine.model.parameters()).grad[0, 0] = float("nan")
    assert math.isnan(engine.step(1e-3))
    assert all(torch.equal(p, params[n]) for n, p in engine.model.named_parameters())
    for saved, state in zip(moments, engine.optimizer.state.values()):
        assert all(torch.equal(saved[k], state[k]) for k in saved)
    assert all(p.grad is None for p in engine.model.parameters())  # the bad gradient is not carried over


def test_step_guard_counts_bad_steps_flags_spikes_and_stops_at_the_limit():
    guard = StepGuard(max_bad_steps=3, spike_factor=3.0)
    for step in range(1, 21):
        assert guard.check(step, 2.0, 1.0) == {"bad_steps": 0}
    assert guard.check(21, 7.0, 1.0) == {"bad_steps": 0, "loss_spike": True}  # > 3 x the running mean of 2
    assert guard.check(22, float("nan"), 1.0) == {"skipped": True, "bad_steps": 1}
    assert guard.check(23, 2.0, 1.0) == {"bad_steps": 1}  # a good step resets the consecutive count
    guard.raise_if_diverged()
    guard.check(24, 2.0, float("inf"))
    guard.check(25, float("nan"), float("nan"))
    guard.raise_if_diverged()  # 2 in a row: not yet
    guard.check(26, float("nan"), 1.0)
    with pytest.raises(TrainingDiverged, match=r"3 consecutive non-finite steps \(the last at step 26"):
        guard.raise_if_diverged()


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    for error in (ConfigError("bad key"), DataError("bad shard"), CheckpointError("bad checkpoint")):
        assert isinstance(error, UserError)
        assert run_cli(lambda: (_ for _ in ()).throw(error)) == 2
        assert capsys.readouterr().err == f"error: {error}\n"
    with pytest.raises(ValueError, match="a bug"):  # a plain ValueError is a bug, not a user error
        run_cli(lambda: (_ for _ in ()).throw(ValueError("a bug")))


@pytest.mark.slow
def test_diverging_run_skips_bad_steps_then_stops_with_its_checkpoint_intact(tmp_path):
    run_dir = tmp_path / "run"
    run_train("train.max_steps=2", "train.checkpoint_every=2", f"run.dir={run_dir}")
    checkpoint = run_dir / "checkpoints" / "step_000002"
    before = {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}
    # An absurd learning rate without clipping: step 3 blows the weights up, then every loss is non-finite.
    proc = run_train("train.max_steps=20", "train.checkpoint_every=100", "train.max_bad_steps=2", "optim.lr=1e30",
                     "optim.grad_clip=0", "optim.warmup_steps=0", "optim.schedule=constant", f"run.dir={run_dir}",
                     "resume=auto", check=False)
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: 2 consecutive non-finite steps")
    assert "last checkpoint is intact" in errors[0] and "Traceback" not in proc.stderr
    skipped = [r for r in records(run_dir) if r.get("skipped")]
    assert len(skipped) == 2 and all(not math.isfinite(r["loss"] + r["grad_norm"]) for r in skipped)
    assert skipped[-1]["bad_steps"] == 2 and "non-finite loss" in proc.stderr
    assert {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002"]


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_with_the_collective_named(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_train("train.max_steps=200", "train.checkpoint_every=0", "parallel.timeout_s=10",
                       "train.micro_batch_size=null", f"run.dir={run_dir}", launcher=torchrun(2))
    wait_for_step(run_dir, 2, proc)
    workers = _worker_pids(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGSTOP)  # rank 1 hangs: rank 0 waits in its next collective
    try:
        _wait_until_ended(workers[0], timeout=240)  # rank 0 gives up after parallel.timeout_s
        # torchrun would wait 30 s for the stopped rank to act on its SIGTERM before killing it.
        os.kill(workers[1], signal.SIGKILL)
        _, stderr = finish(proc, timeout=240)
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode != 0
    # After the progress bar's last \r: "error: rank 0: collective all_gather_single called from train.py:84 ..."
    line = next(line for line in stderr.splitlines() if "error: rank " in line and ": collective " in line)
    assert "timed out after 10s (parallel.timeout_s)" in line and "called from train.py:" in line
    assert f"exitcode  : {EXIT_TIMEOUT}" in stderr  # torchrun's failure report: rank 0 exited with the timeout code


def _wait_until_ended(pid: int, timeout: float) -> None:
    """Until the process has exited (gone, or a zombie its parent has not reaped yet)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} still running after {timeout} s")


def _worker_pids(launcher_pid: int) -> list[int]:
    """The training processes torchrun started (its children), by start order."""
    deadline = time.time() + 30
    while time.time() < deadline:
        children = [int(p) for p in open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split()]
        if len(children) >= 2:
            return sorted(children)
        time.sleep(0.1)
    return []
