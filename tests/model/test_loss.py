"""The fused, chunked linear cross-entropy (model/loss.py) against `F.cross_entropy(logits.float())`: the same
loss and gradients (hidden states and head weight, tied or not) in fp32 and under bf16 autocast, ignored
targets, padding ids, every reduction, and the model's `labels=` path that train.py and eval use."""
import pytest
import torch
import torch.nn.functional as F

from model import loss as loss_module
from model.lm import LMHead
from model.loss import linear_cross_entropy
from model.memory import saved_bytes

IGNORE = -100


def reference(hidden, weight, targets, reduction="mean", valid_vocab_size=None):
    logits = hidden @ weight.T
    if valid_vocab_size is not None:
        logits = logits.masked_fill(torch.arange(weight.shape[0]) >= valid_vocab_size, float("-inf"))
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction=reduction).view(
        targets.shape if reduction == "none" else ())


def problem(tokens=300, d=24, vocab=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, tokens // 2, d, generator=gen)
    weight = torch.randn(vocab, d, generator=gen) / d ** 0.5
    targets = torch.randint(0, vocab * 3 // 4, (2, tokens // 2), generator=gen)  # below any valid_vocab_size
    targets[0, ::7] = IGNORE
    return hidden, weight, targets


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """A few hundred logits per chunk, so the tests cross many chunk boundaries and a ragged last one."""
    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", 37 * 200)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("valid_vocab_size", [None, 150])
def test_same_loss_and_gradients_as_full_logits_in_fp32(reduction, valid_vocab_size):
    hidden, weight, targets = problem()
    grads = []
    for fn in (reference, linear_cross_entropy):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w, targets, reduction=reduction, valid_vocab_size=valid_vocab_size)
        (2.5 * loss).backward()  # a non-unit incoming gradient
        grads.append((loss.detach(), h.grad, w.grad))
    for expected, actual in zip(*grads):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    if valid_vocab_size is not None:
        assert grads[1][2][valid_vocab_size:].abs().max() == 0  # padding rows learn nothing


def test_per_token_losses_match_and_ignored_tokens_are_zero():
    hidden, weight, targets = problem()
    with torch.no_grad():
        losses = linear_cross_entropy(hidden, weight, targets, reduction="none")
    torch.testing.assert_close(losses, reference(hidden, weight, targets, reduction="none"), rtol=1e-5, atol=1e-5)
    assert losses.shape == targets.shape and (losses[targets == IGNORE] == 0).all()
    with pytest.raises(ValueError, match="reduction='none' gives no gradient"):
        linear_cross_entropy(hidden.requires_grad_(), weight, targets, reduction="none")
    with pytest.raises(ValueError, match="reduction 'avg' is not one of"):
        linear_cross_entropy(hidden, weight, targets, reduction="avg")


def test_bf16_autocast_matches_the_autocast_logits_path():
    """The matmuls in bf16 as autocast would run them, the softmax in fp32: close to today's bf16 path."""
    hidden, weight, targets = problem(tokens=512, d=64, vocab=1000)
    results = []
    for fn in (reference, linear_cross_entropy):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h, w, targets)
        loss.backward()
        assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
        results.append((loss.detach(), h.grad, w.grad))
    (loss_ref, h_ref, w_ref), (loss, h_grad, w_grad) = results
    torch.testing.assert_close(loss, loss_ref, rtol=1e-3, atol=1e-3)
    for actual, expected in ((h_grad, h_ref), (w_grad, w_ref)):
        assert (actual - expected).norm() / expected.norm() < 2e-2


@pytest.mark.parametrize("tie", [True, False])
def test_model_labels_path_matches_its_logits(make_lm, tie):
    """lm(ids, labels=...) (what train.py calls) == cross entropy of lm(ids), gradients of every parameter
    included (the tied head's reach the embedding through both uses)."""
    lm = make_lm("GA", vocab_size=128, valid_vocab_size=100, tie_embeddings=tie)
    ids = torch.randint(0, 100, (2, 33), generator=torch.Generator().manual_seed(0))
    labels = ids[:, 1:].clone()
    labels[1, :5] = IGNORE
    cu_seqlens = torch.tensor([0, 10, 32, 64], dtype=torch.int32)
    grads = []
    for fused in (False, True):
        lm.zero_grad(set_to_none=True)
        if fused:
            loss = lm(ids[:, :-1], cu_seqlens=cu_seqlens, labels=labels)
        else:
            loss = F.cross_entropy(lm(ids[:, :-1], cu_seqlens=cu_seqlens).float().flatten(0, 1), labels.flatten())
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}))
    (expected_loss, expected), (actual_loss, actual) = grads
    torch.testing.assert_close(actual_loss, expected_loss, rtol=1e-5, atol=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    with torch.no_grad():
        per_token = lm(ids[:, :-1], cu_seqlens=cu_seqlens, labels=labels, reduction="none")
    assert per_token.shape == labels.shape
    torch.testing.assert_close(per_token.sum() / (labels != IGNORE).sum(), expected_loss, rtol=1e-5, atol=1e-5)


def test_nothing_of_size_tokens_x_vocab_is_kept():
    """Kept for the backward: d hidden [tokens, d] and d weight [vocab, d] (fp32), never the logits."""
    tokens, d, vocab = 512, 16, 4000  # logits would be 8 MB in fp32; what is kept is about 0.3 MB
    head = LMHead(d, vocab, None)
    hidden = torch.randn(1, tokens, d, requires_grad=True)
    targets = torch.randint(0, vocab, (1, tokens))
    assert saved_bytes(head, hidden, targets) == tokens * d * 4 + vocab * d * 4
