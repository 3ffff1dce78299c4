"""The Hugging Face export of an encoder (checkpoints/hf/exporter.py; checkpoints/hf/remote/: BatonForMaskedLM, LION
in baton_lion.py, GLA / Mamba2 / attention both ways): for every encoder mixer, the exported model gives Baton's
logits on rows padded on either side at odd lengths (each row's tokens encoded on their own, as Baton encodes a
document) and Baton's masked-LM loss; the export directory loads through AutoModelForMaskedLM in a process that
cannot import Baton, its tokenizer's <mask> at the model's mask id (data/mlm.py); Baton reads the export back; a
tokenizer that is not the model's is one line and nothing is written."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from checkpoints import load_model, write_export
from checkpoints.hf.remote.configuration_baton import BatonConfig
from checkpoints.hf.remote.modeling_baton import BatonForCausalLM, BatonForMaskedLM
from configs.errors import CheckpointError
from data.mlm import mlm_vocab
from data.tokenizer import HFTokenizer
from model import LM, ModelConfig
from model.config import GLAConfig, LIONConfig
from tests.checkpoints.hf_models import VOCAB as DATA_VOCAB, make_tokenizer, run_without_baton
from tests.model.conftest import small_config

# The model's vocabulary as masked-LM training sizes it for the test tokenizer's DATA_VOCAB ids: the mask id is
# DATA_VOCAB, the first id past the data's, and the model's valid_vocab_size (its logit and the padding's are -inf).
MLM_VOCAB = mlm_vocab(ModelConfig(), DATA_VOCAB)
MASK_ID = MLM_VOCAB["valid_vocab_size"]
PAD_ID = 2  # make_tokenizer's <pad>
LENGTH = 23
# Each row's run of real tokens (start, length): right padding, none, left padding, and row 0's span again (rows
# sharing a span run as one batch).
SPANS = [(0, 17), (0, LENGTH), (5, 18), (0, 17)]
TOLERANCE = 1e-5
LION = LIONConfig(num_heads=2)
# id: (pattern, settings over tests/model/conftest.py's small_config). Every encoder mixer, both LION feature maps
# and decays, LION without its short convs and with wider values, and a tied hybrid of all four families.
CASES = {
    "F": ("FF", {}),
    "N": ("NN", {}),
    "B": ("BB", {}),
    "B-no-conv": ("BB", dict(lion=LIONConfig(num_heads=2, use_short_conv=False, expand_v=2.0))),
    "G": ("GG", {}),
    "G-plain": ("GG", dict(gla=GLAConfig(num_heads=2, use_short_conv=False, use_output_gate=False))),
    "M": ("MM", {}),
    "A": ("AA", {}),
    "BGMA-tied": ("BGMA", dict(tie_embeddings=True)),
}


def build_encoder(case: str, seed: int = 0) -> LM:
    """An fp32 encoder of the case's pattern whose every parameter is its init plus N(0, 0.1) noise (gates, decays,
    norms and biases away from their init values; logits of order one)."""
    pattern, settings = CASES[case]
    torch.manual_seed(seed)
    lm = LM(small_config(pattern, bidirectional=True, **MLM_VOCAB, **{"lion": LION, **settings})).eval()
    with torch.no_grad():
        for param in lm.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return lm


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [4, LENGTH] (the data's ids, about one in six the mask id, padding PAD_ID) and attention_mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, DATA_VOCAB, (len(SPANS), LENGTH), generator=generator)
    ids[torch.rand(ids.shape, generator=generator) < 0.15] = MASK_ID
    mask = torch.zeros_like(ids)
    for row, (start, length) in enumerate(SPANS):
        mask[row, start:start + length] = 1
    return ids.masked_fill(mask == 0, PAD_ID), mask


@torch.no_grad()
def baton_row_logits(lm: LM, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Baton's logits [length, DATA_VOCAB] of each row's real tokens, the row encoded alone."""
    return [lm(row[keep.bool()][None])[0, :, :DATA_VOCAB] for row, keep in zip(ids, mask)]


def exported(lm: LM) -> BatonForMaskedLM:
    model = BatonForMaskedLM(BatonConfig(baton=dataclasses.asdict(lm.config)))
    model.load_state_dict(lm.state_dict())
    return model.eval()


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_masked_lm_gives_baton_logits_on_padded_rows(case):
    lm = build_encoder(case)
    ids, mask = padded_batch()
    expected = baton_row_logits(lm, ids, mask)
    assert max(e.abs().amax() for e in expected) > 1  # logits of order one: the tolerance means something
    logits = exported(lm)(ids, attention_mask=mask).logits
    for row, keep in enumerate(mask.bool()):
        assert (logits[row, keep, :DATA_VOCAB] - expected[row]).abs().amax() <= TOLERANCE, row
    assert torch.isneginf(logits[..., MASK_ID:]).all()  # the mask id and the padding ids are never predicted


@torch.no_grad()
def test_labels_give_baton_masked_lm_loss():
    """labels at the masked positions, -100 elsewhere, no shift: Baton's mean cross entropy over them."""
    lm = build_encoder("BGMA-tied")
    ids, _ = padded_batch()
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = torch.randint(0, DATA_VOCAB, labels[:, ::3].shape, generator=torch.Generator().manual_seed(2))
    assert (exported(lm)(ids, labels=labels).loss - lm(ids, labels=labels)).abs() <= TOLERANCE


def test_padding_inside_a_row_and_the_wrong_head_class_are_refused_clearly():
    lm = build_encoder("B")
    ids, mask = padded_batch()
    mask[1, 10] = 0  # a hole: not padding before or after the row's tokens
    with pytest.raises(ValueError, match="one run of ones"):
        exported(lm)(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="AutoModelForMaskedLM"):
        BatonForCausalLM(BatonConfig(baton=dataclasses.asdict(lm.config)))
    causal = dataclasses.asdict(small_config("GA"))
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        BatonForMaskedLM(BatonConfig(baton=causal))


def data_tokenizer(directory: Path, **settings) -> HFTokenizer:
    """A Hugging Face tokenizer (tests/checkpoints/hf_models.py; DATA_VOCAB ids unless settings say)."""
    make_tokenizer(directory, **settings)
    return HFTokenizer(directory / "tokenizer.json")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> HFTokenizer:
    return data_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def export_hf(lm: LM, directory: Path, tokenizer: HFTokenizer) -> Path:
    return write_export(lm, directory, None, tokenizer, {}, format="hf")


LOAD_MASKED_LM_WITHOUT_BATON = """
import importlib.util, json, sys, torch
from transformers import AutoModelForMaskedLM, AutoTokenizer
assert importlib.util.find_spec("model") is None and importlib.util.find_spec("kernels") is None, "Baton importable"
for name, expected in json.load(open(sys.argv[1])).items():
    model = AutoModelForMaskedLM.from_pretrained(expected["export"], trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(expected["export"], trust_remote_code=True)
    assert type(model).__name__ == "BatonForMaskedLM", type(model).__name__
    assert tokenizer.mask_token == "<mask>"
    assert tokenizer.mask_token_id == model.config.mask_token_id == expected["mask_id"]
    mask = torch.tensor(expected["attention_mask"])
    with torch.no_grad():
        logits = model(torch.tensor(expected["input_ids"]), attention_mask=mask).logits
    error = max((logits[row, keep.bool(), :len(reference[0])] - torch.tensor(reference)).abs().max().item()
                for row, (keep, reference) in enumerate(zip(mask, expected["logits"])))
    assert error <= 1e-5, f"{name}: logits differ by {error}"
    print(name, error)
"""


@torch.no_grad()
def test_every_encoder_exports_and_loads_through_auto_masked_lm_without_baton(tokenizer, tmp_path):
    """Another process, outside the repository (nothing of Baton importable): AutoModelForMaskedLM with
    trust_remote_code gives Baton's logits on the padded rows, and AutoTokenizer's <mask> is the model's mask id."""
    ids, mask = padded_batch()
    expected = {}
    for case in CASES:
        lm = build_encoder(case)
        export = export_hf(lm, tmp_path / case, tokenizer)
        config = json.loads((export / "config.json").read_text())
        assert config["architectures"] == ["BatonForMaskedLM"]
        assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_baton.BatonForMaskedLM"
        assert "AutoModelForCausalLM" not in config["auto_map"]
        expected[case] = {"export": str(export), "mask_id": MASK_ID, "input_ids": ids.tolist(),
                          "attention_mask": mask.tolist(),
                          "logits": [row.tolist() for row in baton_row_logits(lm, ids, mask)]}
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    result = run_without_baton(LOAD_MASKED_LM_WITHOUT_BATON, tmp_path, str(tmp_path / "expected.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == len(CASES)


@torch.no_grad()
def test_baton_reads_the_export_back(tokenizer, tmp_path):
    """checkpoints.load_model (so also init.from and eval) of the export is the same encoder."""
    lm = build_encoder("BGMA-tied")
    again = load_model(export_hf(lm, tmp_path / "hf", tokenizer))
    assert again.config == lm.config
    ids, _ = padded_batch()
    assert torch.equal(again(ids), lm(ids))


@pytest.mark.parametrize("settings, message", [
    (dict(vocab_size=DATA_VOCAB - 8), "the tokenizer has 312 ids but the encoder's mask id"),
    (dict(vocab_size=DATA_VOCAB, extra_special_tokens=("<mask>",)), "already has a token '<mask>'"),
])
def test_a_tokenizer_that_is_not_the_encoders_is_one_line_and_nothing_is_written(settings, message, tmp_path):
    other = data_tokenizer(tmp_path / "tokenizer", **settings)
    with pytest.raises(CheckpointError, match=message) as error:
        export_hf(build_encoder("B"), tmp_path / "hf", other)
    assert "\n" not in str(error.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tokenizer"]  # no export, no temporary directory
