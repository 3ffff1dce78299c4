"""Encoders (model/lion.py, model/bidirectional.py): LION-LIT / -D / -S and GLA, Mamba2 and attention in their
bidirectional form. The three forms of model.lion.form give one model (logits and every gradient, fp64); packed
documents stay apart in both directions; what an encoder cannot do (decode, a causal-only mixer) is one line."""
import pytest
import torch

from configs.errors import ConfigError
from model import LM, ModelConfig
from model.config import LIONConfig
from model.layers import apply_rotary

VOCAB = 61
PATTERNS = ["F", "N", "B", "G", "M", "A", "BGMA"]


def encoder(pattern: str, form: str = "chunk", dtype=torch.float64, **overrides) -> LM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, d_model=32, pattern=pattern, bidirectional=True, gla=dict(num_heads=2),
               mamba2=dict(head_dim=16, d_state=8), attention=dict(num_heads=2), lion=dict(num_heads=2, form=form))
    return LM.from_config({**cfg, **overrides}).to(dtype)


def logits_and_grads(lm: LM, tokens, cu_seqlens):
    lm.zero_grad()
    logits = lm(tokens, cu_seqlens=cu_seqlens)
    (logits * torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view(logits.shape)).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in lm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("pattern", PATTERNS)
def test_forms_give_one_model(pattern):
    """full == chunk == rnn at odd lengths with packed documents: logits and the gradient of every parameter."""
    tokens = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(1))
    cu_seqlens = torch.tensor([0, 11, 12, 37, 60, 74], dtype=torch.int32)
    # GLA and Mamba2 compute their gates in fp32 even in an fp64 model: their gradients carry fp32 rounding
    tol = dict(rtol=1e-6, atol=1e-8) if set(pattern) & set("GM") else dict(rtol=1e-9, atol=1e-10)
    reference = logits_and_grads(encoder(pattern, "chunk"), tokens, cu_seqlens)
    for form in ("full", "rnn"):
        logits, grads = logits_and_grads(encoder(pattern, form), tokens, cu_seqlens)
        torch.testing.assert_close(logits, reference[0], **tol)
        assert grads.keys() == reference[1].keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[1][name], **tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("pattern", ["F", "B", "G", "A"])
def test_packed_documents_see_only_themselves(pattern):
    """A row of three packed documents gives each the logits it has alone: nothing crosses a boundary either way."""
    lm = encoder(pattern)
    tokens = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    bounds = [0, 9, 23, 40]
    packed = lm(tokens, cu_seqlens=torch.tensor(bounds, dtype=torch.int32))
    # attention's rotary angles are fp32 and the packed documents sit at other positions of the row
    tol = 1e-6 if pattern == "A" else 1e-10
    for bos, eos in zip(bounds, bounds[1:]):
        torch.testing.assert_close(packed[:, bos:eos], lm(tokens[:, bos:eos]), rtol=tol, atol=tol)


def test_an_encoder_sees_later_tokens():
    """Changing the last token changes the first position's logits (a causal model's would not move)."""
    lm = encoder("B")
    tokens = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % VOCAB
    assert not torch.allclose(lm(tokens)[0, 0], lm(changed)[0, 0])


def test_bidirectional_resolves_from_the_pattern():
    assert ModelConfig(pattern="B", vocab_size=VOCAB).is_encoder
    assert ModelConfig(pattern="BFN", vocab_size=VOCAB, lion=LIONConfig(num_heads=4)).is_encoder is True
    assert not ModelConfig(pattern="GA", vocab_size=VOCAB).is_encoder
    assert ModelConfig(pattern="GA", vocab_size=VOCAB, bidirectional=True).is_encoder


@pytest.mark.parametrize("overrides, message", [
    (dict(pattern="B", bidirectional=False), "lion_s only exists bidirectional"),
    (dict(pattern="BD"), "gated_deltanet has no bidirectional form"),
    (dict(pattern="W", bidirectional=True), "sliding_window has no bidirectional form"),
    (dict(pattern="M", bidirectional=True, mamba2=dict(allow_neg_eigval=True)), "allow_neg_eigval has no bidirectional"),
    (dict(pattern="B", lion=dict(form="diagonal")), "model.lion.form: 'diagonal' is not one of full, chunk, rnn"),
    (dict(pattern="G", bidirectional=True, lion=dict(form="x")), "model.lion.form"),
    (dict(pattern="N", lion=dict(decay_min=0.99, decay_max=0.9)), "decay_min <= decay_max"),
    (dict(pattern="F", lion=dict(num_heads=3)), "model.lion.num_heads=3 must divide"),
])
def test_bad_encoder_configs_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        LM.from_config(dict(dict(vocab_size=VOCAB, d_model=32), **overrides))


def test_an_encoder_refuses_decoding():
    lm = encoder("B", dtype=torch.float32)
    with pytest.raises(ConfigError, match="encoder"):
        lm.init_state(1, 8)
    with pytest.raises(ConfigError, match="encoder"):
        lm.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)


def test_decays_start_spread_over_heads():
    """LION-D's lambda and LION-S's lambda at a zero projection start with 1 - lambda log-uniform in
    [1 - decay_max, 1 - decay_min], a different one per head."""
    lm = encoder("NB", dtype=torch.float32, lion=dict(num_heads=8, decay_min=0.9, decay_max=0.999))
    d, s = lm.blocks[0].mixer, lm.blocks[1].mixer
    for lam in (torch.sigmoid(d.decay_logit), 1 - torch.sigmoid(s.a_bias)):
        assert lam.min() >= 0.9 - 1e-6 and lam.max() <= 0.999 + 1e-6 and len(set(lam.tolist())) == 8


def test_flops_count_both_directions():
    causal, bidirectional = (LM.from_config(dict(vocab_size=VOCAB, d_model=32, pattern="G", gla=dict(num_heads=2),
                                                 bidirectional=b)) for b in (False, True))
    from model.flops import mixing_flops_per_token
    assert mixing_flops_per_token(bidirectional, 64)[0] == 2 * mixing_flops_per_token(causal, 64)[0]


@torch.no_grad()
def test_bidirectional_attention_projects_out_once():
    """An encoder's attention layer is o_proj(SDPA without a mask) with heads x head_dim != d_model (32 -> 16 wide
    heads): the output projection maps the heads' width to d_model once."""
    lm = encoder("A", attention=dict(num_heads=2, head_dim=8))
    layer = lm.blocks[0].mixer
    x = torch.randn(2, 13, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    heads = lambda proj: proj(x).view(2, 13, 2, 8)  # noqa: E731
    positions, inv_freq = torch.arange(13), layer.inv_freq(x.device)
    q, k = (apply_rotary(heads(proj), positions, inv_freq).transpose(1, 2) for proj in (layer.q_proj, layer.k_proj))
    o = torch.nn.functional.scaled_dot_product_attention(q, k, heads(layer.v_proj).transpose(1, 2))
    torch.testing.assert_close(layer(x), layer.o_proj(o.transpose(1, 2).reshape(2, 13, 16)))
