"""The masked-LM objective (data/mlm.py, train.objective=mlm) and encoders end to end: the masks are exact and do
not depend on the layout (data-parallel ranks, sequence-parallel slices); an encoder trains, resumes to the same
losses, trains under sp=2 to the same losses, and evaluates from its checkpoint (held-out MLM accuracy and
perplexity) and exports as a Hugging Face masked LM with the checkpoint's logits and its mask token; what it
cannot do is one line and exit 2."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from checkpoints import load_model
from configs.errors import ConfigError
from configs.schema import load_config
from data import prepare_dataset
from data.config import DataConfig
from data.mlm import MaskedLoader, MLMConfig, mask_tokens, mlm_vocab, scored_per_row
from model.config import ModelConfig
from tests.checkpoints.hf_models import run_without_baton
from tests.training_runs import ENV, REPO, losses, run_train, torchrun

ENCODER = ["model=lion_s_tiny", "model.vocab_size=8320", "model.d_model=64", "model.lion.num_heads=2",
           "train.mlm.mask_rate=0.3", "eval.mlm.mask_rate=0.15", "train.seq_len=128"]
MASK_ID, VOCAB = 8192, 8192
# In a process without Baton: the export's masked LM and tokenizer on a text with a <mask>; prints [ids, logits].
LOAD_MASKED_LM = """
import json, sys, torch
from transformers import AutoModelForMaskedLM, AutoTokenizer
model = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
assert tokenizer.mask_token_id == model.config.mask_token_id, (tokenizer.mask_token_id, model.config.mask_token_id)
ids = tokenizer("def main():" + tokenizer.mask_token + "return 0")["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0, :, :tokenizer.mask_token_id]
print(json.dumps([ids, logits.tolist()]))
"""


def test_every_row_scores_the_same_count_whatever_the_slicing():
    cfg = MLMConfig(mask_rate=0.3)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (6, 100))
    rows = list(range(40, 46))
    inputs, labels = mask_tokens(tokens, rows, 0, 100, seed=7, cfg=cfg, mask_id=MASK_ID, vocab_size=VOCAB)
    assert scored_per_row(100, 0.3) == 30 and ((labels != -100).sum(1) == 30).all()
    scored = labels != -100
    assert (labels[scored] == tokens[scored]).all() and (inputs[~scored] == tokens[~scored]).all()
    # slices of the rows at any offsets (sequence-parallel ranks) are the slices of the whole rows' masks
    for cut in (1, 37, 50):
        parts = [mask_tokens(tokens[:, lo:hi], rows, lo, 100, 7, cfg, MASK_ID, VOCAB) for lo, hi in ((0, cut), (cut, 100))]
        assert (np.concatenate([p[0] for p in parts], 1) == inputs).all()
        assert (np.concatenate([p[1] for p in parts], 1) == labels).all()
    # another seed or row masks elsewhere
    other, _ = mask_tokens(tokens, [r + 1 for r in rows], 0, 100, 7, cfg, MASK_ID, VOCAB)
    assert (other != inputs).any()


def test_eighty_ten_ten():
    tokens = np.full((400, 256), 5)
    inputs, labels = mask_tokens(tokens, list(range(400)), 0, 256, 0, MLMConfig(), MASK_ID, VOCAB)
    scored = labels != -100
    shares = [(inputs[scored] == MASK_ID).mean(), ((inputs[scored] != MASK_ID) & (inputs[scored] != 5)).mean()]
    assert shares[0] == pytest.approx(0.8, abs=0.01) and shares[1] == pytest.approx(0.1, abs=0.01)


def test_masked_loader_is_the_same_over_data_and_sequence_parallel_ranks():
    dataset = prepare_dataset(DataConfig(), progress=False)
    cfg = MLMConfig(mask_rate=0.2)

    def batch(dp_rank=0, dp_size=1, sp_rank=0, sp_size=1, micro=4):
        loader = MaskedLoader(dataset.loader(64, micro, 4, dp_rank, dp_size, sp_rank, sp_size, seed=3), cfg,
                              MASK_ID, VOCAB, seed=3)
        next(loader)
        return next(loader)  # the second step: rows 4..7

    whole = batch()
    assert whole["loss_divisor"].item() == 4 * scored_per_row(64, 0.2)
    dp = [batch(rank, 2, micro=2) for rank in range(2)]
    sp = [batch(sp_rank=rank, sp_size=2) for rank in range(2)]
    for key in ("input_ids", "labels"):
        assert torch.equal(torch.cat([b[key] for b in dp], 0), whole[key])
        assert torch.equal(torch.cat([b[key] for b in sp], 1), whole[key])
    assert sp[0]["loss_divisor"].item() == whole["loss_divisor"].item() / 2
    assert not torch.equal(whole["input_ids"], next(dataset.loader(64, 4, 4, seed=3).__iter__())["input_ids"])


def test_objective_follows_the_model_and_mismatches_are_one_line():
    assert load_config(["model=lion_s_tiny"])[0].train.objective == "mlm"
    assert load_config(["model=bert_tiny"])[0].train.objective == "mlm"
    assert load_config([])[0].train.objective == "clm"
    for overrides, message in [(["model=lion_s_tiny", "train.objective=clm"], "train it with train.objective=mlm"),
                               (["train.objective=mlm"], "needs an encoder"),
                               (["model=lion_d_tiny", "data=mqar"], "needs text data"),
                               (["train.objective=bert"], "not one of clm, mlm"),
                               (["model=lion_s_tiny", "train.mlm.mask_rate=1.5"], "mask_rate must be in")]:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides)
    with pytest.raises(ConfigError, match="no id for the mask token"):
        mlm_vocab(ModelConfig(pattern="B", vocab_size=8192), 8192)
    assert mlm_vocab(ModelConfig(pattern="B"), 8192) == {"vocab_size": 8320, "valid_vocab_size": 8192}


@pytest.mark.slow
def test_an_encoder_trains_resumes_and_evaluates(tmp_path):
    common = [*ENCODER, "train.max_steps=4", "train.checkpoint_every=2"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_train(*common, f"run.dir={straight}")
    run_train(*common, "train.max_steps=2", f"run.dir={interrupted}")
    run_train(*common, "resume=auto", f"run.dir={interrupted}")
    assert losses(interrupted) == losses(straight) and len(losses(straight)) == 4
    results = json.loads((straight / "results.json").read_text())
    assert 0 <= results["mlm_accuracy"] <= 1 and results["mlm_perplexity"] > 1
    assert "sample.txt" not in {p.name for p in straight.iterdir()}  # an encoder does not generate

    checkpoint = straight / "checkpoints" / "step_000004"
    evaluate = lambda *args: subprocess.run([sys.executable, "-m", "eval", f"checkpoint={checkpoint}", *args],  # noqa
                                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    proc = evaluate(f"out={tmp_path / 'eval'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert figures["mlm_accuracy"] == pytest.approx(results["mlm_accuracy"])
    assert figures["tasks"]["mlm"]["settings"]["mask_rate"] == 0.15
    for task in ("ppl", "passkey"):
        proc = evaluate(f"tasks=[{task}]", f"out={tmp_path / task}")
        last = proc.stderr.strip().splitlines()[-1]  # (torch's warnings about loading in one process come first)
        assert proc.returncode == 2 and last.startswith("error: eval.tasks") and "encoder" in last
    export = subprocess.run([sys.executable, "-m", "scripts.export", f"checkpoint={checkpoint}",
                             f"out={tmp_path / 'hf'}", "format=hf"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert export.returncode == 0, export.stderr[-2000:]
    # The Hugging Face export is a masked LM whose tokenizer's <mask> is the id training masked with, and which
    # gives the checkpoint's logits (tests/checkpoints/test_hf_encoder_export.py checks every mixer)
    loaded = run_without_baton(LOAD_MASKED_LM, tmp_path, str(tmp_path / "hf"))
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    ids, logits = json.loads(loaded.stdout.splitlines()[-1])
    assert MASK_ID in ids  # the text's <mask>
    with torch.no_grad():
        expected = load_model(checkpoint)(torch.tensor([ids]))[0, :, :VOCAB]
    assert (torch.tensor(logits) - expected).abs().amax() <= 1e-5


@pytest.mark.slow
def test_an_encoder_under_sequence_parallelism_trains_as_one_process(tmp_path):
    """torchrun sp=2 (every recurrent layer both combines, the masks of each slice) == one process, per step."""
    common = [*ENCODER, "model.n_layers=2", "train.max_steps=3", "train.checkpoint_every=0", "train.micro_batch_size=4"]
    run_train(*common, f"run.dir={tmp_path / 'one'}")
    run_train(*common, "parallel.sp=2", f"run.dir={tmp_path / 'sp2'}", launcher=torchrun(2))
    one, sp2 = losses(tmp_path / "one"), losses(tmp_path / "sp2")
    assert sorted(one) == sorted(sp2) == [1, 2, 3]
    for step, loss in one.items():
        assert sp2[step] == pytest.approx(loss, rel=1e-5), step
