"""scripts/slurm/train.sbatch on a real Slurm: the single-node cluster of conftest.py runs three
submissions of one small CPU run side by side: one left alone, one requeued mid-run with
`scontrol requeue` (Slurm sends SIGTERM to every process of the job, then starts it again), one sent
the USR1 that `--signal=B:USR1@300` delivers to the batch shell before the time limit (the script
stops the ranks and requeues itself). Both interrupted runs must end with the losses of the one left alone.

Checkpoints are written only at the end (checkpoint_every > max_steps), so a resumed run that starts
past step 0 proves the checkpoint came from the stop signal.
"""
import json
import re
import sys
import time
from pathlib import Path

import pytest

from local_slurm import SlurmError, free_port
from tests.training_runs import REPO, losses

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(480)]

SCRIPT = REPO / "scripts" / "slurm" / "train.sbatch"
# Enough steps that the run is still training when the test, polling, sees step INTERRUPT_AT and
# interrupts it, even on an idle machine (a step takes milliseconds there).
MAX_STEPS = 40
INTERRUPT_AT = 2
RUN = ["model=transformer_tiny", "model.n_layers=1", "model.d_model=64", "model.attention.num_heads=2",
       "train.seq_len=64", "train.global_batch_size=2", "train.micro_batch_size=2", "optim.warmup_steps=2",
       f"train.max_steps={MAX_STEPS}", f"train.checkpoint_every={10 * MAX_STEPS}",
       "logging.wandb.mode=disabled", "eval.held_out_tokens=64", "eval.sample_tokens=1"]
# One node, no GPU, one task on one CPU: the script's defaults ask for 2 nodes of 8 GPUs.
ON_THIS_NODE = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1"]


def submit(slurm, run_dir: Path) -> str:
    env = {"PY": sys.executable, "RDZV_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return slurm.sbatch(*ON_THIS_NODE, f"--job-name={run_dir.name}", f"--output={run_dir}.out", str(SCRIPT),
                        *RUN, f"run.dir={run_dir}", cwd=REPO, env=env)


@pytest.fixture(scope="module")
def runs(slurm, tmp_path_factory):
    """{name: (run dir, the job's final `scontrol show job`, its log)} for the three submissions."""
    root = tmp_path_factory.mktemp("runs")
    jobs = {name: submit(slurm, root / name) for name in ("straight", "requeued", "signalled")}
    interrupts = {"requeued": lambda job: slurm.scontrol("requeue", job),
                  "signalled": lambda job: slurm.scancel("--batch", "--signal=USR1", job)}
    deadline = time.monotonic() + 240
    while interrupts and time.monotonic() < deadline:
        for name in list(interrupts):
            if max(losses(root / name), default=0) >= INTERRUPT_AT:
                interrupts.pop(name)(jobs[name])
        time.sleep(0.1)
    results = {}
    for name, job in jobs.items():
        try:
            info = slurm.wait_for_end(job, timeout=max(deadline - time.monotonic(), 0) + 120)
        except SlurmError as err:
            info = {"JobState": str(err), "Restarts": "?", "ExitCode": "?"}
        log = (root / f"{name}.out").read_text(errors="replace") if (root / f"{name}.out").exists() else ""
        results[name] = (root / name, info, log)
    assert not interrupts, f"{sorted(interrupts)} never reached step {INTERRUPT_AT}:\n" + "\n".join(
        results[name][2][-2000:] for name in interrupts)
    return results


def describe(result) -> str:
    run_dir, info, log = result
    return f"{info['JobState']} restarts={info['Restarts']} exit={info['ExitCode']}; log:\n{log[-3000:]}"


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in (run_dir / "checkpoints").glob("step_*")
                  if (m := re.fullmatch(r"step_(\d+)", p.name)))


def test_sbatch_runs_the_training_to_the_end(runs):
    run_dir, info, log = runs["straight"]
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "0", "0:0"), describe(runs["straight"])
    assert sorted(losses(run_dir)) == list(range(1, MAX_STEPS + 1))
    assert json.loads((run_dir / "results.json").read_text())["step"] == MAX_STEPS


@pytest.mark.parametrize("name", ["requeued", "signalled"])
def test_interrupted_job_is_requeued_and_ends_with_the_uninterrupted_losses(runs, name):
    run_dir, info, log = runs[name]
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0"), describe(runs[name])
    # The only checkpoint before the last step is the one the stop signal made, past the step it came at.
    saved_on_signal = [step for step in checkpoint_steps(run_dir) if step < MAX_STEPS]
    assert saved_on_signal and saved_on_signal[0] >= INTERRUPT_AT, (checkpoint_steps(run_dir), describe(runs[name]))
    assert f"at step {saved_on_signal[0]}" in log, describe(runs[name])
    assert losses(run_dir) == losses(runs["straight"][0]), describe(runs[name])


def test_the_script_asks_slurm_for_the_usr1_it_handles(runs):
    header = [line for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in header and any(re.fullmatch(r"#SBATCH --signal=B:USR1@\d+", h) for h in header)
    assert "USR1 (time limit near)" in runs["signalled"][2], describe(runs["signalled"])
