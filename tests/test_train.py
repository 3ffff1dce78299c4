"""The training loop end to end: checkpoints, exact resume after SIGKILL, refusing bad checkpoints.

These run train.py as a user would (subprocess), on the embedded stdlib corpus (prepared once into
.cache/data and shared by every test and `make train`) with a model small enough for CPU.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from checkpoints import Checkpointer
from configs.schema import load_config
from model import LM
from parallel.engine import Engine
from parallel.topology import Topology
from tests.training_runs import ENV, REPO, SMALL, losses, run_train, start_train


def test_engine_steps_lower_the_loss_on_a_fixed_batch():
    cfg, _ = load_config(SMALL)
    torch.manual_seed(0)
    engine = Engine(LM.from_config(cfg.model), cfg.optim, Topology())
    batch = torch.randint(0, 500, (4, 33))
    history = []
    for _ in range(8):
        logits = engine.model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        engine.backward(loss)
        grad_norm = engine.step(1e-2)
        history.append(loss.item())
        assert grad_norm > 0
    assert history[-1] < history[0] - 0.5


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_every_loss(tmp_path):
    steps = ["train.max_steps=10", "train.checkpoint_every=3", "train.keep_checkpoints=2", "train.eval_every=4"]
    straight = tmp_path / "straight"
    run_train(*steps, f"run.dir={straight}")
    reference = losses(straight)
    assert sorted(reference) == list(range(1, 11))
    assert (straight / "loss_curve.png").stat().st_size > 0
    results = json.loads((straight / "results.json").read_text())
    assert results["held_out_bpb"] > 0 and results["held_out_tokens"] > 0
    assert [p.name for p in Checkpointer(straight / "checkpoints", 2).complete()] == ["step_000009", "step_000010"]
    # Evaluating the saved final checkpoint gives the end-of-training held-out figures.
    final = straight / "checkpoints" / "step_000010"
    proc = subprocess.run([sys.executable, "-m", "eval", f"checkpoint={final}"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    evaluated = json.loads((final / "eval.json").read_text())
    assert evaluated["step"] == 10
    assert evaluated["held_out_loss"] == pytest.approx(results["held_out_loss"], rel=1e-6)

    killed = tmp_path / "killed"
    proc = start_train(*steps, f"run.dir={killed}")
    deadline = time.time() + 300
    while time.time() < deadline and len(losses(killed) if (killed / "metrics.jsonl").exists() else {}) < 7:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before_kill = losses(killed)
    assert 7 <= len(done_before_kill) < 10, "the run must be killed between checkpoints, before the end"

    run_train(*steps, f"run.dir={killed}", "resume=auto")
    assert losses(killed) == reference  # bit-identical on CPU, every step, no step repeated or missing


@pytest.mark.slow
def test_refuses_other_model_and_existing_run_without_touching_it(tmp_path):
    run_dir = tmp_path / "run"
    run_train("train.max_steps=2", "train.checkpoint_every=2", f"run.dir={run_dir}")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    other = run_train("train.max_steps=4", "model.d_model=128", f"run.dir={run_dir}", "resume=auto", check=False)
    assert other.returncode == 2 and "another model" in other.stderr and "d_model" in other.stderr
    assert other.stderr.strip().count("\n") == 0

    fresh = run_train("train.max_steps=4", f"run.dir={run_dir}", check=False)
    assert fresh.returncode == 2 and "resume=auto" in fresh.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_killed_save_is_never_taken_for_a_checkpoint(tmp_path):
    cfg, _ = load_config(SMALL)
    engine = Engine(LM.from_config(cfg.model), cfg.optim, Topology())
    ckpt = Checkpointer(tmp_path, keep=2)
    saved = ckpt.save(1, engine, {"tokens_seen": 1, "model_config": {}})
    ckpt.wait()
    half_written = tmp_path / ".step_000002.tmp"
    half_written.mkdir()
    (half_written / "__0_0.distcp").write_bytes(b"partial")
    assert ckpt.latest() == saved
    # The next save clears the leftover and completes.
    assert ckpt.save(2, engine, {"tokens_seen": 2, "model_config": {}}).name == "step_000002"
    ckpt.wait()
    assert not half_written.exists() and ckpt.latest().name == "step_000002"


def test_checkpoint_round_trip_restores_model_and_optimizer(tmp_path):
    cfg, raw = load_config(SMALL)
    torch.manual_seed(0)
    source = Engine(LM.from_config(cfg.model), cfg.optim, Topology())
    batch = torch.randint(0, 500, (2, 17))
    source.backward(F.cross_entropy(source.model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()))
    source.step(1e-2)
    checkpointer = Checkpointer(tmp_path, keep=1)
    path = checkpointer.save(1, source, {"tokens_seen": 7, "model_config": {"d_model": 64}})
    checkpointer.wait()
    torch.manual_seed(1)
    target = Engine(LM.from_config(cfg.model), cfg.optim, Topology())
    state = Checkpointer(tmp_path, keep=1).load(path, target, {"d_model": 64})
    assert state["step"] == 1 and state["tokens_seen"] == 7
    for (name, a), b in zip(source.model.state_dict().items(), target.model.state_dict().values()):
        assert torch.equal(a, b), name
    moments = lambda opt: [s["exp_avg"] for s in opt.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(moments(source.optimizer), moments(target.optimizer)))
