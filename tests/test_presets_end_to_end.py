"""A preset of every family runs train.py to the end (one step, evaluation, sample) with its vocabulary
following the data: the embedded corpus (8,192-piece tokenizer) and a prepared set whose tokenizer (32,100
pieces) is larger than the 32,000 the presets' sizes are counted at (the model gets 32,128 ids, the top 28
padding). Narrowed to one layer pattern at d_model 64 so they stay fast; train.main runs in this process,
which spares each run the imports."""
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import train
from data.prepare import PrepareConfig, prepare_shards
from data.stdlib import stdlib_documents
from data.tokenizer import Tokenizer, TokenizerConfig
from eval.checkpoint import load_checkpoint
from model import ModelConfig

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["gla_hybrid_125m", "mamba2_hybrid_125m", "gated_deltanet_hybrid_125m", "griffin_125m", "transformer_125m"]
NARROW = ["model.d_model=64", "model.d_ff=128", "model.attention.num_heads=2", "model.attention.num_kv_heads=null",
          "model.gla.num_heads=2", "model.mamba2.expand=1", "model.mamba2.head_dim=32", "model.mamba2.d_state=16",
          "model.gated_deltanet.num_heads=2", "model.gated_deltanet.head_dim=16", "model.rglru.num_heads=2",
          "model.attention.window=16", "train.seq_len=64",
          "train.global_batch_size=2", "train.max_steps=1", "eval.held_out_tokens=500", "eval.batch_size=16",
          "eval.ppl.max_len=128", "eval.ppl.max_documents=1", "eval.sample_tokens=4", "logging.wandb.mode=disabled",
          f"data.cache_dir={REPO / '.cache' / 'data'}"]
EMBEDDED_VOCAB = 8192
LARGE_TOKENIZER = 32100  # > the presets' 32,000; not a multiple of 128
TEXT_BYTES = 2_500_000  # of stdlib source: enough for sentencepiece to find that many BPE pieces (2 MB: ~37.9k)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread, as tests/training_runs.ENV gives train.py subprocesses: tests share few cores, and
    on an oversubscribed machine a second thread costs several times the CPU time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def overrides(preset: str, run_dir: Path, *extra: str) -> list[str]:
    """The preset, narrowed to one period of its layer pattern."""
    pattern = OmegaConf.load(REPO / "configs" / "model" / f"{preset}.yaml").pattern
    period = len(ModelConfig(pattern=pattern).layer_mixers())
    return [f"model={preset}", f"model.n_layers={period}", *NARROW, f"run.dir={run_dir}", *extra]


def check_finished_run(run_dir: Path, vocab_size: int, valid_vocab_size, sampled: bool = True) -> None:
    """Everything a run writes, and the resolved vocabulary in its config.yaml and its checkpoint."""
    results = json.loads((run_dir / "results.json").read_text())
    assert results["step"] == 1 and math.isfinite(results["held_out_loss"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "loss" in record] == [1]
    assert (run_dir / "loss_curve.png").stat().st_size > 0
    assert (run_dir / "sample.txt").is_file() == sampled
    if sampled:
        assert (run_dir / "sample.txt").read_text().startswith("def ")
    saved = json.loads((run_dir / "checkpoints" / "step_000001" / "train_state.json").read_text())["model_config"]
    for model in (OmegaConf.load(run_dir / "config.yaml").model, saved):
        assert (model["vocab_size"], model["valid_vocab_size"]) == (vocab_size, valid_vocab_size)


@pytest.mark.slow
@pytest.mark.parametrize("preset", FAMILIES)
def test_every_family_runs_to_the_end_on_the_embedded_data(preset, tmp_path):
    assert train.main(overrides(preset, tmp_path)) == 0
    check_finished_run(tmp_path, EMBEDDED_VOCAB, None)  # 8,192 is a multiple of 128: no padding


@pytest.fixture(scope="module")
def large_tokenizer_set(tmp_path_factory) -> Path:
    """Stdlib source prepared with a tokenizer of LARGE_TOKENIZER pieces."""
    text_dir, size = tmp_path_factory.mktemp("text"), 0
    for i, doc in enumerate(stdlib_documents()):
        (text_dir / f"doc_{i:05d}.txt").write_text(doc, encoding="utf-8")
        size += len(doc.encode())
        if size >= TEXT_BYTES:
            break
    out = tmp_path_factory.mktemp("prepared") / "large_tokenizer"
    prepare_shards(PrepareConfig(source=str(text_dir), out=str(out), held_out_fraction=0.05, workers=1,
                                 tokenizer=TokenizerConfig(vocab_size=LARGE_TOKENIZER)), progress=False)
    assert Tokenizer(out / "tokenizer.model").vocab_size == LARGE_TOKENIZER
    return out


@pytest.mark.slow
def test_a_tokenizer_larger_than_the_presets_vocabulary(large_tokenizer_set, tmp_path, capfd):
    padded = 128 * math.ceil(LARGE_TOKENIZER / 128)
    assert train.main(overrides("gla_hybrid_125m", tmp_path, "data=shards", f"data.path={large_tokenizer_set}")) == 0
    check_finished_run(tmp_path, padded, LARGE_TOKENIZER)
    # What `python -m eval` loads from the checkpoint: the same model, its padding still masked.
    loaded = load_checkpoint(tmp_path / "checkpoints" / "step_000001", [])
    assert loaded.model.config == loaded.cfg.model and loaded.model.embed.num_embeddings == padded
    logits = loaded.model(torch.tensor([[2, 100, 31999]]))
    assert torch.isneginf(logits[..., LARGE_TOKENIZER:]).all() and torch.isfinite(logits[..., :LARGE_TOKENIZER]).all()
    # An explicit vocabulary smaller than the tokenizer: one line, exit 2, nothing of the run written.
    refused = tmp_path / "refused"
    capfd.readouterr()
    assert train.main(overrides("gla_hybrid_125m", refused, "data=shards", f"data.path={large_tokenizer_set}",
                                "model.vocab_size=32000")) == 2
    assert capfd.readouterr().err.strip() == ("error: model.vocab_size=32000 is smaller than the data's vocabulary "
                                              "32100 (leave it null to follow the data)")
    assert not (refused / "config.yaml").exists()


@pytest.mark.slow
def test_a_failing_sample_is_one_line_and_loses_nothing(tmp_path, monkeypatch, capfd):
    def out_of_range(self, ids):
        raise IndexError("Out of range: piece id is out of range.")

    monkeypatch.setattr(Tokenizer, "decode", out_of_range)
    assert train.main(overrides("transformer_125m", tmp_path)) == 0
    warnings = [line for line in capfd.readouterr().err.splitlines() if "sample" in line]
    assert warnings == ["warning: sample failed (IndexError: Out of range: piece id is out of range.)"]
    check_finished_run(tmp_path, EMBEDDED_VOCAB, None, sampled=False)
