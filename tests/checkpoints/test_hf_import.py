"""Import of Hugging Face checkpoints (scripts/import_hf.py, checkpoints/hf): logits equal transformers' for
every supported architecture and setting; the tokenizer comes along; bad inputs are one-line errors that write
nothing."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from checkpoints import load_model
from checkpoints.initial import import_export
from configs.errors import CheckpointError
from data.tokenizer import open_tokenizer
from tests.checkpoints.hf_models import ARCHITECTURES, make_hf_model
from tests.training_runs import ENV, REPO

IDS = torch.randint(3, 320, (2, 23), generator=torch.Generator().manual_seed(0))


def imported_logits(hf_dir, out):
    import_export(hf_dir, out)
    return load_model(out).eval()(IDS)


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_import_gives_transformers_logits(kind, tmp_path):
    hf = make_hf_model(kind, tmp_path / "hf")
    with torch.no_grad():
        expected = hf(IDS).logits
        got = imported_logits(tmp_path / "hf", tmp_path / "baton")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    info = json.loads((tmp_path / "baton" / "export.json").read_text())
    assert info["architecture"] == ARCHITECTURES[kind]["cls"]


@pytest.mark.parametrize("settings", [dict(attention_bias=True), dict(tie_word_embeddings=True, rope_theta=1e4)],
                         ids=["qwen3-bias", "qwen3-tied"])
def test_import_settings(settings, tmp_path):
    hf = make_hf_model("qwen3", tmp_path / "hf", **settings)
    with torch.no_grad():
        torch.testing.assert_close(imported_logits(tmp_path / "hf", tmp_path / "baton"), hf(IDS).logits,
                                   rtol=0, atol=1e-5)


def test_sharded_checkpoint_and_tokenizer_come_along(tmp_path):
    hf = make_hf_model("llama", tmp_path / "src")
    hf.save_pretrained(str(tmp_path / "hf"), max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "src" / name, tmp_path / "hf" / name)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    proc = subprocess.run([sys.executable, "-m", "scripts.import_hf", f"hf={tmp_path / 'hf'}", f"out={tmp_path / 'b'}"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "b")(IDS), hf(IDS).logits, rtol=0, atol=1e-5)
    tokenizer = open_tokenizer(tmp_path / "b" / "tokenizer.json")
    assert tokenizer.eos_id == 1 and tokenizer.decode(tokenizer.encode("class Baton:")) == "class Baton:"


def run_import(hf_dir, out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.import_hf", f"hf={hf_dir}", f"out={out}"], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=300)


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path):
    make_hf_model("llama", tmp_path / "good")

    def refused(directory, message):
        with pytest.raises(CheckpointError, match=message):
            import_export(directory, tmp_path / "out")
        assert not (tmp_path / "out").exists()

    unknown = tmp_path / "gpt2"
    shutil.copytree(tmp_path / "good", unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps(config | {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    refused(unknown, "model_type 'gpt2' is not supported")

    setting = tmp_path / "gelu"
    shutil.copytree(tmp_path / "good", setting)
    (setting / "config.json").write_text(json.dumps(config | {"hidden_act": "gelu"}))
    refused(setting, "hidden_act='gelu' is not supported")

    shapes = tmp_path / "shapes"
    shutil.copytree(tmp_path / "good", shapes)
    (shapes / "config.json").write_text(json.dumps(config | {"intermediate_size": 128}))
    refused(shapes, r"blocks.0.mlp.down_proj.weight: shape \(64, 96\) in the weights, \(64, 128\) in the model")

    sharded = tmp_path / "sharded"
    make_hf_model("llama", tmp_path / "src").save_pretrained(str(sharded), max_shard_size="40KB")
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    refused(sharded, "shard listed in model.safetensors.index.json is missing")

    proc = run_import(unknown, tmp_path / "out")  # the command: one line, exit 2
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "gpt2" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    make_hf_model("qwen2", tmp_path / "hf")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    save_file({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)},
              str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.0.self_attn.rotary_emb.inv_freq: unknown tensor"):
        import_export(tmp_path / "hf", tmp_path / "out")
