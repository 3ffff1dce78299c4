"""LION's three forms (kernels/lion) against the bidirectional recurrence a token at a time, forward and every
gradient: the full attention form, the chunkwise form (GLA's chunked op forward and on the reversed sequences) and
the RNN form (GLA's fused recurrent op both ways), for no decay (LION-LIT), a scalar decay (LION-D / -S, Mamba2)
and a vector decay (GLA), normalised (LION) and not (bidirectional GLA / Mamba2).

Tolerances (max error relative to the largest reference magnitude): fp64 1e-10 (every form is exact; only the
summation order differs); fp32 in Triton's interpreter 2e-4 (as tests/kernels/test_gla.py).
"""
import pytest
import torch
import torch.nn.functional as F

from kernels.lion import (backward_gates, chunk_lion, lion, lion_attention, naive_recurrent_lion, recurrent_lion,
                          reverse_sequences)
from inputs import CU_SEQLENS

GATES = ("none", "scalar", "vector")


def lion_inputs(B, T, H, K, V, gate, normalize, seed=0):
    """fp64 leaves: positive features when normalising (LION's feature maps are positive), log decays <= 0."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k = rand(B, T, H, K), rand(B, T, H, K) / K ** 0.5
    if normalize:
        q, k = F.elu(q) + 1, F.elu(k) + 1
    inputs = dict(q=q, k=k, v=rand(B, T, H, V))
    if gate != "none":
        inputs["g"] = F.logsigmoid(rand(B, T, H, *((K,) if gate == "vector" else ())) + 2)
    return inputs, rand(B, T, H, V)


def assert_matches(actual: dict, expected: dict, tol: float) -> None:
    """Max error relative to the largest reference magnitude, floored at 1 (the inputs are O(1)): a normalised
    output of one token is v whatever q, so dq is rounding noise around 0 there."""
    for name, e in expected.items():
        a = actual[name]
        assert a.shape == e.shape and torch.isfinite(a).all(), f"{name}: shape {tuple(a.shape)} or non-finite"
        error = ((a - e).abs().max() / e.abs().max().clamp_min(1.0)).item()
        assert error <= tol, f"{name}: relative error {error:.2e} > {tol:.0e}"


def run(fn, inputs, upstream, dtype=torch.float64, **kwargs):
    """y and the gradient of every input (fp64)."""
    leaves = {name: x.detach().to(dtype).requires_grad_() for name, x in inputs.items()}
    y = fn(leaves["q"], leaves["k"], leaves["v"], leaves.get("g"), **kwargs)
    (y.double() * upstream).sum().backward()
    return {"y": y.detach().double(), **{f"d{name}": x.grad.double() for name, x in leaves.items()}}


@pytest.mark.parametrize("T", [1, 37, 130])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("normalize", [True, False], ids=["lion", "plain"])
def test_the_three_forms_equal_the_recurrence_fp64(T, gate, normalize):
    inputs, upstream = lion_inputs(2, T, 2, 8, 5, gate, normalize, seed=T)
    expected = run(naive_recurrent_lion, inputs, upstream, normalize=normalize)
    for form in ("full", "chunk", "rnn"):
        assert_matches(run(lion, inputs, upstream, normalize=normalize, form=form), expected, 1e-10)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("normalize", [True, False], ids=["lion", "plain"])
def test_packed_documents_fp64(gate, normalize):
    """cu_seqlens with odd, empty and one-token documents: every form equals the recurrence, forward and backward."""
    inputs, upstream = lion_inputs(1, int(CU_SEQLENS[-1]), 2, 8, 5, gate, normalize)
    expected = run(naive_recurrent_lion, inputs, upstream, normalize=normalize, cu_seqlens=CU_SEQLENS)
    for fn in (lion_attention, chunk_lion, recurrent_lion):
        assert_matches(run(fn, inputs, upstream, normalize=normalize, cu_seqlens=CU_SEQLENS), expected, 1e-10)


@pytest.mark.parametrize("form", ["full", "chunk", "rnn"])
def test_documents_are_isolated_in_both_directions(form):
    """Each document's outputs equal the op on that document alone; changing one document changes nothing of the
    others (neither the earlier ones, the forward direction, nor the later ones, the backward one), and no
    gradient crosses a boundary."""
    inputs, _ = lion_inputs(1, int(CU_SEQLENS[-1]), 2, 8, 5, "vector", True, seed=3)
    bounds = CU_SEQLENS.tolist()
    y = lion(**inputs, cu_seqlens=CU_SEQLENS, form=form)
    for bos, eos in zip(bounds, bounds[1:]):
        if eos > bos:
            alone = lion(**{n: x[:, bos:eos] for n, x in inputs.items()}, form=form)
            torch.testing.assert_close(y[:, bos:eos], alone, rtol=1e-12, atol=1e-12)
    middle = (bounds[4], bounds[5])  # a long document with others before and after it
    changed = {n: x.clone() for n, x in inputs.items()}
    for x in changed.values():
        x[:, middle[0]:middle[1]] += 1.0
    y_changed = lion(**changed, cu_seqlens=CU_SEQLENS, form=form)
    outside = torch.ones(y.shape[1], dtype=torch.bool)
    outside[middle[0]:middle[1]] = False
    torch.testing.assert_close(y_changed[:, outside], y[:, outside], rtol=0, atol=0)
    leaves = {n: x.clone().requires_grad_() for n, x in inputs.items()}
    lion(**leaves, cu_seqlens=CU_SEQLENS, form=form)[:, middle[0]:middle[1]].sum().backward()
    for name, leaf in leaves.items():
        assert leaf.grad[:, outside].abs().max() == 0, f"d{name} crosses a document boundary"


def test_mask_convention():
    """M_ij = prod of lambda_m over earlier < m <= later (M_ii = 1, symmetric), built here by explicit products,
    is the matrix all three forms apply: Y = Scale(Q K^T (.) M) V."""
    T, H, K, V = 9, 1, 4, 3
    inputs, _ = lion_inputs(1, T, H, K, V, "scalar", True, seed=5)
    lam = inputs["g"][0, :, 0].exp()
    M = torch.ones(T, T, dtype=torch.float64)
    for i in range(T):
        for j in range(T):
            for m in range(min(i, j) + 1, max(i, j) + 1):
                M[i, j] *= lam[m]
    assert torch.equal(M, M.T)
    q, k, v = (inputs[n][0, :, 0] for n in "qkv")
    A = (q @ k.T) * K ** -0.5 * M
    expected = (A / A.sum(-1, keepdim=True)) @ v
    for form in ("full", "chunk", "rnn"):
        y = lion(**inputs, form=form, eps=0.0)[0, :, 0]
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    # The backward recurrence decays by the next token's gate: h_i = g_{i+1}, 0 at the sequence's end.
    g = inputs["g"]
    torch.testing.assert_close(backward_gates(g)[:, :-1], g[:, 1:])
    assert backward_gates(g)[:, -1].abs().max() == 0


def test_reversal_within_documents():
    x = torch.arange(int(CU_SEQLENS[-1])).view(1, -1)
    reversed_x = reverse_sequences(x, CU_SEQLENS)
    bounds = CU_SEQLENS.tolist()
    for bos, eos in zip(bounds, bounds[1:]):
        assert reversed_x[0, bos:eos].tolist() == list(range(eos - 1, bos - 1, -1))
    assert torch.equal(reverse_sequences(reversed_x, CU_SEQLENS), x)
    gates = backward_gates(x.double().unsqueeze(-1), CU_SEQLENS)[0, :, 0]
    for bos, eos in zip(bounds, bounds[1:]):
        assert gates[bos:eos].tolist() == [float(t + 1) for t in range(bos, eos - 1)] + ([0.0] if eos > bos else [])


@pytest.mark.parametrize("gate", ["none", "vector"])
def test_triton_path_in_the_interpreter(gate, monkeypatch):
    """BATON_KERNELS=triton (Triton's interpreter on CPU): the chunked and recurrent forms, fp32, packed documents,
    against the fp64 recurrence, forward and every gradient."""
    monkeypatch.setenv("BATON_KERNELS", "triton")
    cu_seqlens = torch.tensor([0, 5, 70, 71, 100], dtype=torch.int32)
    inputs, upstream = lion_inputs(1, 100, 1, 16, 8, gate, True, seed=7)
    expected = run(naive_recurrent_lion, inputs, upstream, cu_seqlens=cu_seqlens)
    assert_matches(run(chunk_lion, inputs, upstream, torch.float32, cu_seqlens=cu_seqlens), expected, 2e-4)
    if gate == "none":
        assert_matches(run(recurrent_lion, inputs, upstream, torch.float32, cu_seqlens=cu_seqlens), expected, 2e-4)


def test_bad_form_is_one_line():
    inputs, _ = lion_inputs(1, 4, 1, 4, 4, "none", True)
    with pytest.raises(ValueError, match="form 'diagonal' is not one of full, chunk, rnn"):
        lion(**inputs, form="diagonal")
