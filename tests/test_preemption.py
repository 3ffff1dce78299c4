"""Preemption and restarts: SIGTERM / SIGUSR1 save the step reached and exit 75, torchrun restarts a group
whose rank was killed, a save killed at any moment never leaves a broken checkpoint for resume=auto, and a
run interrupted any number of times reproduces every loss of the run that never stopped (bitwise, CPU)."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from checkpoints import Checkpointer, read_train_state
from configs.schema import load_config
from model import LM
from parallel.engine import Engine
from parallel.topology import Topology
from training.faults import EXIT_PREEMPTED
from tests.training_runs import ENV, REPO, SMALL, finish, losses, run_train, start_train, torchrun, wait_for_step

STEPS = ["train.max_steps=10", "train.checkpoint_every=4", "train.keep_checkpoints=2", "eval.held_out_tokens=300"]


@pytest.mark.slow
def test_signals_and_kills_any_number_of_times_reproduce_every_loss(tmp_path):
    straight = tmp_path / "straight"
    run_train(*STEPS, f"run.dir={straight}")
    reference = losses(straight)
    assert sorted(reference) == list(range(1, 11))

    run_dir = tmp_path / "interrupted"
    for stop, after_step in ((signal.SIGTERM, 2), (signal.SIGUSR1, 5), (signal.SIGKILL, 7)):
        proc = start_train(*STEPS, f"run.dir={run_dir}", "resume=auto")
        wait_for_step(run_dir, after_step, proc)
        os.kill(proc.pid, stop)
        if stop != signal.SIGKILL:
            time.sleep(0.2)
            os.kill(proc.pid, stop)  # a second signal during the save changes nothing
        _, stderr = finish(proc, timeout=300)
        reached = max(losses(run_dir))
        if stop == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
            continue
        assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
        assert f"stopped by {stop.name} at step {reached}" in stderr and "already stopping" in stderr
        # The step reached is saved: resume=auto loses nothing.
        assert Checkpointer(run_dir / "checkpoints", 2).latest().name == f"step_{reached:06d}"
    run_train(*STEPS, f"run.dir={run_dir}", "resume=auto")
    assert losses(run_dir) == reference  # bit-identical on CPU, every step, none repeated or missing


@pytest.mark.slow
def test_torchrun_restarts_a_group_whose_rank_was_killed_and_ends_with_the_same_losses(tmp_path):
    # The default micro batch (null): torchrun --nproc_per_node=2 splits the global batch over the 2 ranks.
    steps = ["train.max_steps=8", "train.checkpoint_every=2", "train.micro_batch_size=null", "eval.held_out_tokens=300"]
    straight = tmp_path / "straight"
    proc = run_train(*steps, f"run.dir={straight}", launcher=torchrun(2))
    assert "train.micro_batch_size=2: global batch 4 over 2 data-parallel rank(s)" in proc.stdout
    reference = losses(straight)

    run_dir = tmp_path / "restarted"
    proc = start_train(*steps, f"run.dir={run_dir}", launcher=torchrun(2, "--max-restarts=1"))
    wait_for_step(run_dir, 5, proc)
    workers = [int(p) for p in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
    os.kill(max(workers), signal.SIGKILL)  # one rank dies; torchrun restarts both, they resume by themselves
    stdout, stderr = finish(proc, timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed from" in stdout  # the restarted ranks took the newest complete checkpoint by themselves
    assert losses(run_dir) == reference


KILLED_SAVER = textwrap.dedent("""
    import sys
    from configs.schema import load_config
    from model import LM
    from checkpoints import Checkpointer
    from parallel.engine import Engine
    from parallel.topology import Topology
    cfg, _ = load_config(sys.argv[2:])
    engine = Engine(LM.from_config(cfg.model), cfg.optim, Topology())
    checkpointer = Checkpointer(sys.argv[1], keep=2)
    latest = checkpointer.latest()
    step = int(latest.name.split("_")[1]) if latest else 0
    while True:  # save, publish, clean up, as fast as it goes, until killed
        step += 1
        checkpointer.save(step, engine, {"tokens_seen": step, "model_config": {}})
        checkpointer.wait()
""")


@pytest.mark.slow
def test_a_save_killed_at_any_moment_leaves_the_previous_checkpoint_whole(tmp_path):
    """SIGKILL at random moments of back-to-back saves (during the write, the rename, the keep-k cleanup):
    every time, resume=auto's choice is a checkpoint that loads completely."""
    root = tmp_path / "checkpoints"
    cfg, _ = load_config(SMALL)
    rng = random.Random(0)
    published = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(root), *SMALL], cwd=REPO, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while _newest_step(root) <= published and time.time() < deadline:  # wait until it is saving
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))  # then kill it somewhere in the next saves
        proc.kill()
        proc.wait()
        checkpointer = Checkpointer(root, keep=2)
        latest = checkpointer.latest()
        if latest is None:
            continue
        step = int(latest.name.split("_")[1])
        assert step >= published  # nothing complete was ever lost
        published = step
        assert read_train_state(latest)["step"] == step
        engine = Engine(LM.from_config(cfg.model), cfg.optim, Topology())
        assert checkpointer.load(latest, engine, {})["step"] == step  # every shard present and readable
        visible = [p.name for p in root.iterdir() if not p.name.startswith(".")]
        assert all((root / name / "train_state.json").is_file() for name in visible)
    assert published >= 6, "the saver did not publish a checkpoint every round: the test proves nothing"


def _newest_step(root) -> int:
    latest = Checkpointer(root, keep=2).latest()
    return int(latest.name.split("_")[1]) if latest else 0
