"""A vocabulary that follows the data: vocab_for_data's rounding and checks, and the padding ids it adds
masked in every output of the model (training logits, decode steps, generation, a reloaded export)."""
import pytest
import torch
import torch.nn.functional as F

from checkpoints import load_model, save_export
from configs.errors import ConfigError
from model import LM, ModelConfig
from model.config import vocab_for_data

VOCAB = 100  # the data's ids

PADDED = 128  # VOCAB rounded up to a multiple of 128


@pytest.mark.parametrize("vocab_size, data_vocab, expected", [
    (None, 8192, {"vocab_size": 8192, "valid_vocab_size": None}),     # the embedded tokenizer: no padding
    (None, 32000, {"vocab_size": 32000, "valid_vocab_size": None}),
    (None, 32100, {"vocab_size": 32128, "valid_vocab_size": 32100}),
    (None, 50257, {"vocab_size": 50304, "valid_vocab_size": 50257}),
    (None, 64, {"vocab_size": 128, "valid_vocab_size": 64}),          # data=mqar's own ids, no tokenizer
    (32000, 32000, {"vocab_size": 32000, "valid_vocab_size": None}),  # set by the user: kept as is
    (40000, 32100, {"vocab_size": 40000, "valid_vocab_size": 32100}),
])
def test_vocab_follows_the_data_rounded_up(vocab_size, data_vocab, expected):
    assert vocab_for_data(ModelConfig(vocab_size=vocab_size), data_vocab) == expected


def test_a_vocab_smaller_than_the_data_is_a_one_line_error():
    with pytest.raises(ConfigError, match="model.vocab_size=8192 is smaller than the data's vocabulary 32100") as err:
        vocab_for_data(ModelConfig(vocab_size=8192), 32100)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="model.valid_vocab_size=200 must be in"):
        ModelConfig(vocab_size=128, valid_vocab_size=200)
    with pytest.raises(ConfigError, match="model.vocab_size is null"):
        LM(ModelConfig(pattern="A"))


def padded_lm(make_lm, pattern: str) -> LM:
    """VOCAB real ids in a head of PADDED rows whose padding rows would win every argmax if not masked."""
    lm = make_lm(pattern, vocab_size=PADDED, valid_vocab_size=VOCAB)
    with torch.no_grad():
        lm.lm_head.weight[VOCAB:] = 50 * lm.lm_head.weight[:VOCAB].abs().max()
    return lm


@pytest.mark.parametrize("pattern", ["GA", "MD"])
def test_padding_ids_are_never_scored_learnt_or_sampled(make_lm, pattern):
    lm = padded_lm(make_lm, pattern)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = lm(ids[:, :-1])
    assert logits.shape[-1] == PADDED
    assert torch.isneginf(logits[..., VOCAB:]).all() and torch.isfinite(logits[..., :VOCAB]).all()
    # Training: the loss is the loss over the real ids alone, and the padding rows learn nothing.
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    real = F.cross_entropy(logits[..., :VOCAB].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, real)
    loss.backward()
    assert lm.lm_head.weight.grad[VOCAB:].abs().max() == 0 and lm.lm_head.weight.grad[:VOCAB].abs().max() > 0
    # Decode steps and generation (greedy and sampled) see the same mask.
    step_logits = lm.step(ids[:, 0], lm.init_state(2, max_len=1))
    assert torch.isneginf(step_logits[:, VOCAB:]).all()
    for temperature, top_p in ((0.0, 1.0), (1.0, 1.0), (2.0, 0.9)):
        out = lm.generate(ids[:, :4], max_new_tokens=12, temperature=temperature, top_p=top_p,
                          generator=torch.Generator().manual_seed(1))
        assert out.shape == (2, 16) and int(out.max()) < VOCAB


def test_bf16_logits_keep_the_mask(make_lm):
    lm = padded_lm(make_lm, "GA")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lm(torch.randint(0, VOCAB, (1, 16)))
    assert logits.dtype == torch.bfloat16 and torch.isneginf(logits[..., VOCAB:]).all()
    assert torch.isfinite(logits[..., :VOCAB]).all()


def test_an_export_keeps_the_mask(make_lm, tmp_path):
    lm = padded_lm(make_lm, "GA")
    save_export(lm, tmp_path / "export")
    loaded = load_model(tmp_path / "export")
    assert (loaded.config.vocab_size, loaded.config.valid_vocab_size) == (PADDED, VOCAB)
    ids = torch.randint(0, VOCAB, (1, 16))
    torch.testing.assert_close(loaded(ids), lm(ids))
    assert int(loaded.generate(ids, max_new_tokens=8).max()) < VOCAB
