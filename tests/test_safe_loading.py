"""A checkpoint directory someone hands you cannot run code: a malicious pickle planted in any of its files
is refused (one line, exit 2) by resume=auto, python -m eval and checkpoints.load_model, and never runs."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from checkpoints import Checkpointer, load_model
from configs.errors import CheckpointError
from configs.schema import load_config
from model import LM
from parallel.engine import Engine
from parallel.topology import Topology
from tests.training_runs import ENV, REPO, SMALL


class Payload:
    """Unpickling this runs a shell command that leaves a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real single-process checkpoint of the SMALL model with its run config (as train.py writes it)."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg, raw = load_config([*SMALL, f"run.dir={run_dir}"])
    engine = Engine(LM.from_config(cfg.model), cfg.optim, Topology())
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=1)
    checkpointer.save(1, engine, {"tokens_seen": 0, "loader": {}, "model_config": OmegaConf.to_container(raw.model)})
    checkpointer.wait()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(raw))
    return run_dir


def tampered(run_dir, tmp_path, name: str):
    """A copy of the run whose checkpoint file `name` is replaced by a malicious pickle."""
    copy = tmp_path / "tampered"
    shutil.copytree(run_dir, copy)
    target = copy / "checkpoints" / "step_000001" / name
    marker = tmp_path / "payload_ran"
    if name.endswith(".distcp"):
        torch.save({"weights": Payload(marker)}, target)  # a torch zip file, as DCP writes them
    else:
        target.write_bytes(pickle.dumps(Payload(marker)))
    return copy, marker


FILES = [".metadata", "__0_0.distcp", "train_state.json", "rng_rank0.json"]


def test_the_checkpoint_has_the_files_we_tamper_with(run_dir):
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step_000001").iterdir()) == sorted(FILES)


@pytest.mark.parametrize("name", FILES)
def test_no_loader_runs_a_planted_pickle(run_dir, tmp_path, name):
    copy, marker = tampered(run_dir, tmp_path, name)
    checkpoint = copy / "checkpoints" / "step_000001"
    cfg, raw = load_config([*SMALL, f"run.dir={copy}"])
    engine = Engine(LM.from_config(cfg.model), cfg.optim, Topology())
    with pytest.raises(CheckpointError) as err:
        Checkpointer(checkpoint.parent, keep=1).load(checkpoint, engine, OmegaConf.to_container(raw.model))
    assert str(checkpoint) in str(err.value) and "\n" not in str(err.value)
    if name == "rng_rank0.json":  # the model alone does not need the RNG state: loading it is fine
        load_model(checkpoint)
    else:
        with pytest.raises(CheckpointError):
            load_model(checkpoint)
    assert not marker.exists(), "the planted payload ran"


@pytest.mark.slow
def test_the_command_lines_refuse_a_tampered_metadata_file_in_one_line(run_dir, tmp_path):
    copy, marker = tampered(run_dir, tmp_path, ".metadata")
    checkpoint = copy / "checkpoints" / "step_000001"
    for command in ([sys.executable, "-m", "eval", f"checkpoint={checkpoint}", f"out={tmp_path / 'eval'}"],
                    [sys.executable, "train.py", *SMALL, f"run.dir={copy}", "resume=auto", "train.max_steps=2"]):
        proc = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert len(errors) == 1 and ".metadata" in errors[0] and "Traceback" not in proc.stderr
    assert not marker.exists(), "the planted payload ran"
    assert json.loads((checkpoint / "train_state.json").read_text())["step"] == 1  # nothing was overwritten
