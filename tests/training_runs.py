"""Running train.py as a user would (a subprocess) on the embedded stdlib corpus with a CPU-sized model;
shared by the training, fault and preemption tests."""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.vocab_size=8192",  # the embedded tokenizer's, set: some tests build the model without data
         "model.d_model=64", "model.gla.num_heads=2", "model.attention.num_heads=2", "train.seq_len=64",
         "train.global_batch_size=4", "train.micro_batch_size=2", "optim.warmup_steps=2",
         "logging.wandb.mode=disabled", "eval.held_out_tokens=2000", "eval.sample_tokens=8", "train.log_every=1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # several processes share few cores


def run_train(*overrides: str, check: bool = True, launcher: tuple = ()) -> subprocess.CompletedProcess:
    proc = subprocess.run([*(launcher or (sys.executable,)), "train.py", *SMALL, *overrides], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def start_train(*overrides: str, launcher: tuple = ()) -> subprocess.Popen:
    """train.py in the background, its output going to files (a pipe nobody reads would fill up and block
    the run); read them with `finish`."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([*(launcher or (sys.executable,)), "train.py", *SMALL, *overrides], cwd=REPO, env=ENV,
                            stdout=out, stderr=err, text=True, start_new_session=True)
    proc.output_files = (out, err)
    return proc


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    """Wait for a start_train process (killing its whole session after `timeout`); its (stdout, stderr)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
    texts = []
    for file in proc.output_files:
        file.seek(0)
        texts.append(file.read())
    return texts[0], texts[1]


def torchrun(nproc: int, *flags: str) -> tuple:
    return (sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *flags)


def records(run_dir: Path) -> list[dict]:
    """The complete lines of metrics.jsonl: a running job may be writing the last one."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line] if path.exists() else []


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Block until metrics.jsonl has a loss for `step` (the run is then inside step + 1)."""
    deadline = time.time() + timeout
    while step not in losses(run_dir):
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended ({proc.returncode}) before step {step}:\n{finish(proc)[1][-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"train.py did not reach step {step} in {timeout}s")
        time.sleep(0.05)
