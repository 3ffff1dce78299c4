"""End to end: a run trained on 2 data-parallel processes and resumed on 1 has the losses of a 1-process run.

The loader's state is only the count of global rows consumed, and a step's rows do not depend on how many
ranks share them, so the per-step losses match at every step (up to the order of the gradient reduction).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = ["model.d_model=64", "model.gla.num_heads=2", "model.attention.num_heads=2", "train.seq_len=64",
         "train.global_batch_size=4", "train.micro_batch_size=2", "optim.warmup_steps=2", "train.max_steps=10",
         "train.checkpoint_every=5", "logging.wandb.mode=disabled", "eval.held_out_tokens=1000",
         "eval.sample_tokens=4", "train.log_every=1"]


def train(*args: str, processes: int = 1) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"] if processes > 1 else [
        sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, "train.py", *SMALL, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"train.py failed ({done.returncode}):\n{done.stderr[-3000:]}"


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
def test_two_processes_resumed_on_one_match_one_process(tmp_path):
    train(f"run.dir={tmp_path / 'one'}")
    train(f"run.dir={tmp_path / 'two'}", "parallel=fsdp", processes=2)
    train(f"run.dir={tmp_path / 'resumed'}", f"resume={tmp_path / 'two' / 'checkpoints' / 'step_000005'}")
    one, two, resumed = losses(tmp_path / "one"), losses(tmp_path / "two"), losses(tmp_path / "resumed")
    assert sorted(one) == sorted(two) == list(range(1, 11)) and sorted(resumed) == list(range(6, 11))
    for step in range(1, 11):
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), f"2 processes, step {step}"
    for step in range(6, 11):
        assert resumed[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), f"resumed on 1 process, step {step}"
    assert one[10] < one[1]  # it trains: equal losses are not those of a model that never moves
