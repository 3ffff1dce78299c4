"""train.py init.from=<export or HF dir>: a run starts from imported weights (one process, FSDP2 with sequence
parallelism, DeepSpeed ZeRO-3), in the model's own token ids (data prepared with its tokenizer.json); the run
records where it started; a model config that does not match the weights is refused with the first mismatching
name; resuming the run resumes its checkpoint."""
import json
import math
import subprocess
import sys

import pytest
import torch

from checkpoints import load_model
from checkpoints.initial import import_export
from tests.checkpoints.hf_models import TEXT, make_hf_model
from tests.training_runs import ENV, REPO, torchrun

# lr so small that the weights after training are the initial ones to 1e-6: what the run started from shows.
RUN = ["train.seq_len=32", "train.global_batch_size=4", "optim.lr=1e-9", "optim.warmup_steps=0",
       "logging.wandb.mode=disabled", "eval.held_out_tokens=200", "eval.sample_tokens=4", "train.log_every=1",
       "train.checkpoint_every=1", "eval.tasks=[ppl]"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny Llama imported to Baton, and a corpus prepared with its tokenizer."""
    root = tmp_path_factory.mktemp("init_from")
    make_hf_model("llama", root / "hf")
    import_export(root / "hf", root / "import")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.py").write_text(f"# document {i}\n" + TEXT[i * 7:] + TEXT[:i * 13])
    proc = subprocess.run([sys.executable, "-m", "data.prepare", f"source={corpus}", f"out={root / 'data'}",
                           f"tokenizer.path={root / 'import' / 'tokenizer.json'}", "workers=1",
                           "held_out_fraction=0.1"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


def train(root, run_dir, *overrides, launcher=()) -> subprocess.CompletedProcess:
    return subprocess.run([*(launcher or (sys.executable,)), "train.py", f"init.from={root / 'import'}", "data=shards",
                           f"data.path={root / 'data'}", f"run.dir={run_dir}", *RUN, *overrides], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)


def assert_started_from_import(root, run_dir, step: int) -> None:
    trained = load_model(run_dir / "checkpoints" / f"step_{step:06d}")
    for (name, a), b in zip(load_model(root / "import").state_dict().items(), trained.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_a_run_starts_from_the_weights_and_resumes_its_own_checkpoint(imported, tmp_path):
    proc = train(imported, tmp_path / "run", "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "started from the weights of" in proc.stdout
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert f"from: {imported / 'import'}" in config and "num_kv_heads: 2" in config  # the import's model
    assert_started_from_import(imported, tmp_path / "run", 2)
    # The weights at step 2 marked, so a resume that read the import again would be seen.
    step2 = tmp_path / "run" / "checkpoints" / "step_000002"
    resumed = train(imported, tmp_path / "run", "train.max_steps=3", "resume=auto", "optim.lr=1e-2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "started from the weights" not in resumed.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert step2.is_dir() or (tmp_path / "run" / "checkpoints" / "step_000003").is_dir()


def test_a_model_config_that_does_not_match_is_refused_by_name(imported, tmp_path):
    proc = train(imported, tmp_path / "run", "train.max_steps=1", "model.d_ff=128")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: blocks.0.mlp.down_proj.weight: shape (64, 96)")
    preset = train(imported, tmp_path / "run2", "train.max_steps=1", "model=transformer_tiny")
    assert preset.returncode == 2 and "error:" in preset.stderr and "the model" in preset.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("engine", [["parallel=fsdp", "parallel.sp=2"], ["parallel=deepspeed_zero3"]],
                         ids=["fsdp-sp2", "zero3"])
def test_every_engine_starts_from_the_weights(imported, tmp_path, engine):
    proc = train(imported, tmp_path / "run", "train.max_steps=1", "train.micro_batch_size=null", *engine,
                 launcher=torchrun(2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_started_from_import(imported, tmp_path / "run", 1)


def test_eval_scores_an_import_in_its_own_ids(imported, tmp_path):
    """python -m eval on the import: its config.yaml brings the model's tokenizer; here its corpus is the prepared one."""
    proc = subprocess.run([sys.executable, "-m", "eval", f"checkpoint={imported / 'import'}", "tasks=[ppl]",
                           f"out={tmp_path}", "data.source=shards", f"data.path={imported / 'data'}",
                           "eval.held_out_tokens=200"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loss = json.loads((tmp_path / "eval.json").read_text())["held_out_loss"]
    assert 0 < loss < 2 * math.log(320)  # a random model's loss on the model's own 320 ids, not another vocabulary's
