"""A DeepSpeed ZeRO-2 checkpoint loads whole in one process (checkpoints.load_model), exports to safetensors
(python -m scripts.export), and both score the same held-out loss as the live model at the end of
training; a planted pickle in DeepSpeed's files is refused without running."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from checkpoints import load_model
from configs.errors import CheckpointError
from tests.test_safe_loading import Payload
from tests.training_runs import ENV, REPO, run_train, torchrun

ZERO2 = ["parallel=deepspeed_zero2", "train.max_steps=2", "train.checkpoint_every=2", "eval.held_out_tokens=1500",
         "train.micro_batch_size=null"]


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("zero2")
    run_train(*ZERO2, f"run.dir={run_dir}", launcher=torchrun(2))
    return run_dir


def held_out_loss(checkpoint, out) -> float:
    proc = subprocess.run([sys.executable, "-m", "eval", f"checkpoint={checkpoint}", "tasks=[ppl]", f"out={out}"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "eval.json").read_text())["held_out_loss"]


@pytest.mark.slow
def test_deepspeed_checkpoint_and_its_export_score_the_live_models_loss(zero2_run, tmp_path):
    checkpoint = zero2_run / "checkpoints" / "step_000002"
    export = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "scripts.export", f"checkpoint={checkpoint}", f"out={export}"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in export.iterdir()} == {"model.safetensors", "config.json", "config.yaml",
                                                  "tokenizer.model", "export.json"}
    from_checkpoint, from_export = load_model(checkpoint), load_model(export)
    for (name, a), b in zip(from_checkpoint.state_dict().items(), from_export.state_dict().values()):
        assert torch.equal(a, b), name

    live = json.loads((zero2_run / "results.json").read_text())["held_out_loss"]
    assert held_out_loss(checkpoint, tmp_path / "eval_checkpoint") == pytest.approx(live, rel=1e-6)
    assert held_out_loss(export, tmp_path / "eval_export") == pytest.approx(live, rel=1e-6)

    again = subprocess.run([sys.executable, "-m", "scripts.export", f"checkpoint={checkpoint}", f"out={export}"],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "not empty" in again.stderr  # an export is never overwritten


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_planted_pickle_in_deepspeed_files_is_refused(zero2_run, tmp_path, name):
    copy = tmp_path / "step_000002"
    shutil.copytree(zero2_run / "checkpoints" / "step_000002", copy)
    marker = tmp_path / "payload_ran"
    torch.save({"module": Payload(marker)}, copy / "deepspeed" / name)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model(copy)
    assert not marker.exists(), "the planted payload ran"
