"""Export to Hugging Face form (scripts/export.py format=hf, checkpoints/hf/exporter.py): a pure-attention model
is a plain transformers model with Baton's logits and greedy tokens; an import of an export is the same model;
Baton's sentencepiece tokenizer becomes a tokenizer.json with the same ids; lm-eval's `hf` backend scores an
export as Baton's own adapter scores the checkpoint."""
import json
import subprocess
import sys

import pytest
import torch

from checkpoints import load_model, write_export
from checkpoints.initial import import_export, open_weights
from model import LM
from tests.checkpoints.hf_models import make_hf_model
from tests.training_runs import ENV, REPO

IDS = torch.randint(3, 200, (2, 19), generator=torch.Generator().manual_seed(1))


def baton_transformer(**attention) -> LM:
    torch.manual_seed(0)
    model = LM.from_config(dict(vocab_size=256, valid_vocab_size=200, d_model=64, d_ff=96, pattern="A", n_layers=2,
                                tie_embeddings=False, attention=dict(num_heads=4, num_kv_heads=2, **attention)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def test_pure_attention_exports_as_plain_llama(tmp_path):
    from transformers import AutoModelForCausalLM

    model = baton_transformer()
    write_export(model, tmp_path / "hf", None, None, {}, format="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert not list((tmp_path / "hf").glob("*.py"))  # no remote code
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.vocab_size == 200  # cut to the tokenizer's ids: the padding rows are never scored
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, model(IDS)[..., :200], rtol=0, atol=1e-5)
        expected = model.generate(IDS[:1], 6, temperature=0.0)
        got = hf.generate(IDS[:1], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_import_of_an_export_is_the_same_model(kind, tmp_path):
    make_hf_model(kind, tmp_path / "hf")
    import_export(tmp_path / "hf", tmp_path / "baton")
    first = load_model(tmp_path / "baton")
    write_export(first, tmp_path / "exported", None, open_weights(tmp_path / "baton") and None, {}, format="hf")
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["model_type"] == kind
    import_export(tmp_path / "exported", tmp_path / "again")
    again = load_model(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads(
        (tmp_path / "baton" / "config.json").read_text())
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_sentencepiece_tokenizer_exports_with_the_same_ids(tiny_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    from eval.checkpoint import load_checkpoint

    proc = subprocess.run([sys.executable, "-m", "scripts.export", f"checkpoint={tiny_checkpoint}",
                           f"out={tmp_path / 'hf'}", "format=hf"], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tokenizer = load_checkpoint(tiny_checkpoint).dataset.tokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    texts = ["The pass key is 71432. Remember it.", "  indented\n\tcode(x) == 3 ∑ émoji 🙂", ""]
    for text in texts:
        assert hf(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
        assert hf(text)["input_ids"] == [tokenizer.eos_id] + tokenizer.encode(text)  # documents start with EOS
        assert hf.decode(tokenizer.encode(text)) == tokenizer.decode(tokenizer.encode(text))


@pytest.mark.slow
def test_lm_eval_hf_backend_scores_an_export_as_the_baton_adapter(tiny_checkpoint, tmp_path, monkeypatch):
    import lm_eval
    import lm_eval.models.huggingface  # noqa: F401  (registers the model "hf")
    import yaml
    from lm_eval.tasks import TaskManager

    import eval.lm_harness  # noqa: F401  (registers the model "baton")
    from tests.eval.test_lm_harness import TASKS

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # the remote code's module cache
    proc = subprocess.run([sys.executable, "-m", "scripts.export", f"checkpoint={tiny_checkpoint}",
                           f"out={tmp_path / 'hf'}", "format=hf"], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for task in TASKS:
        (tmp_path / f"{task['task']}.yaml").write_text(yaml.safe_dump(task))
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)

    def scores(model: str, model_args: dict, name: str) -> list:
        results = lm_eval.simple_evaluate(model=model, model_args=model_args, batch_size=2, tasks=[name],
                                          task_manager=manager, log_samples=True)
        return [response for sample in results["samples"][name] for response in sample["filtered_resps"]]

    hf_args = {"pretrained": str(tmp_path / "hf"), "trust_remote_code": True, "dtype": "float32", "device": "cpu"}
    # The exported tokenizer starts a text with EOS, as Baton's adapter does. lm-eval's rolling windows add their
    # own prefix token, so perplexity tasks run with add_bos_token=False (README, "Hugging Face").
    for name, extra in (("baton_tiny_choice", {}), ("baton_tiny_rolling", {"add_bos_token": False})):
        baton = scores("baton", {"checkpoint": str(tiny_checkpoint)}, name)
        hf = scores("hf", hf_args | extra, name)
        assert len(baton) == len(hf) > 0
        for ours, theirs in zip(baton, hf):
            ours, theirs = (ours[0], theirs[0]) if isinstance(ours, (list, tuple)) else (ours, theirs)
            assert theirs == pytest.approx(ours, abs=1e-4), name
