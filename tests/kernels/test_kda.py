"""Every Kimi Delta Attention (KDA) path against the naive recurrence, forward and every gradient.

KDA is the gated delta rule with a decay per key channel (kernels/kda). The reference is naive_kda in fp64 with
autograd (itself checked against the matrix form of the recurrence). q and k are L2-normalised as the caller
does; beta is drawn from (0, 2), so some steps have a negative eigenvalue. Errors are max|actual - expected| /
max|expected| per tensor (output, final state, and the gradients of q, k, v, g, beta, initial_state, with
random upstream gradients for both o and the final state). Tolerances:
- fp64 chunked PyTorch: 1e-10. Both paths are exact in fp64; only the summation order differs.
- fp32 (chunked PyTorch, and Triton under TRITON_INTERPRET=1): 2e-4, the gated delta rule's (its tests say
  why: fp32 rounding through the triangular solve of the WY form and through cumulative gates).
The Triton cases are small (the interpreter runs some 20x slower than PyTorch) but cover one document spanning
two chunks, documents shorter than a 16-token sub-chunk, an empty and a one-token document, initial and final
states, and fresh buffers filled with NaN (a value a kernel forgets to write shows).
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from kernels.kda import chunk_kda, chunk_kda_vjp, fused_recurrent_kda, kda_state_summary
from kernels.kda.chunk import chunk_kda_torch
from kernels.kda.naive import naive_kda
from kernels.tuning import AUTOTUNERS, pinned_config
from compare import assert_matches, run

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FP32_TOL = 2e-4
NAMES = ("q", "k", "v", "g", "beta")

# Uneven documents, none aligned with the 64-token chunks: one shorter than a sub-chunk, an empty one (its final
# state is its initial state), a single token, and one spanning two chunks (its second holds 6 tokens).
CU_SEQLENS = torch.tensor([0, 7, 7, 8, 78], dtype=torch.int32)
# The same kinds of document within one chunk: the launch-twice check, which runs every kernel twice.
SHORT_CU_SEQLENS = torch.tensor([0, 5, 5, 6, 37], dtype=torch.int32)


def make_inputs(B, T, H, K, V, num_states, gates="normal", seed=0):
    """fp64 leaf inputs and upstream gradients. gates: 'normal' (per channel, around e^-0.13: long memory);
    'mixed' (per channel: gates of almost exactly one, g ~ -1e-6, next to g = -100, so one channel forgets
    at once while its neighbour keeps everything); 'extreme' (g in [-40, -20]: every decay within a chunk
    underflows unless each factor stays <= 1); 'aligned' (normal gates, but nearly parallel keys and beta
    near 2: the WY system (I + diag(beta) M) is as far from the identity as it gets)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    uniform = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    if gates == "extreme":
        g = -20 - 20 * uniform(B, T, H, K)
    elif gates == "mixed":
        g = torch.where(uniform(B, T, H, K) < 0.8, -1e-6 * uniform(B, T, H, K), -100.0)
    else:
        g = F.logsigmoid(rand(B, T, H, K) + 2)
    q, k, beta = rand(B, T, H, K), rand(B, T, H, K), 2 * uniform(B, T, H)
    if gates == "aligned":
        k = rand(1, 1, H, K) + 0.05 * k
        beta = 1.9 + 0.1 * beta / 2
    inputs = dict(q=F.normalize(q, dim=-1), k=F.normalize(k, dim=-1), v=rand(B, T, H, V), g=g, beta=beta,
                  initial_state=rand(num_states, H, K, V))
    upstream = dict(o=rand(B, T, H, V), final_state=rand(num_states, H, K, V))
    return inputs, upstream


def triton_chunk(*args, **kwargs):
    from kernels.kda.triton_chunk import chunk_kda_triton
    return chunk_kda_triton(*args, **kwargs)


def triton_fused_recurrent(*args, **kwargs):
    from kernels.kda.fused_recurrent import fused_recurrent_kda_triton
    return fused_recurrent_kda_triton(*args, **kwargs)


def reference(inputs, upstream, cu_seqlens=None):
    return run(naive_kda, inputs, upstream, torch.float64, "cpu", cu_seqlens)


@pytest.fixture
def triton_backend(monkeypatch):
    """The entry points take the Triton kernels (in the interpreter on CPU)."""
    monkeypatch.setenv("BATON_KERNELS", "triton")


def test_naive_is_the_recurrence():
    """The reference against the definition, written as explicit K x K matrices:
    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T, o_t = scale S_t^T q_t."""
    inputs, _ = make_inputs(2, 5, 2, 8, 4, num_states=2)
    q, k, v, g, beta, state = (inputs[n] for n in (*NAMES, "initial_state"))
    o, final = naive_kda(q, k, v, g, beta, scale=0.5, initial_state=state, output_final_state=True)
    eye = torch.eye(8, dtype=torch.float64)
    for t in range(5):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        transition = (eye - bt * kt[..., :, None] * kt[..., None, :]) @ torch.diag_embed(g[:, t].exp())
        state = transition @ state + bt * kt[..., :, None] * v[:, t, :, None, :]
        torch.testing.assert_close(o[:, t], 0.5 * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    torch.testing.assert_close(final, state)


def test_a_uniform_gate_is_the_gated_delta_rule():
    """With the same decay in every channel KDA is the gated delta rule (kernels/gated_delta_rule)."""
    from kernels.gated_delta_rule.naive import naive_gated_delta_rule
    inputs, _ = make_inputs(1, 9, 2, 8, 4, num_states=1)
    q, k, v, g, beta, state = (inputs[n] for n in (*NAMES, "initial_state"))
    scalar_gate = g[..., 0]
    expected = naive_gated_delta_rule(q, k, v, scalar_gate, beta, initial_state=state, output_final_state=True)
    actual = naive_kda(q, k, v, scalar_gate[..., None].expand_as(g), beta, initial_state=state,
                       output_final_state=True)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


# ---- chunked PyTorch (the CPU path) ----------------------------------------------------------------

# K = 64: the sub-chunk form over wider keys; 100 tokens: a second, partial chunk.
@pytest.mark.parametrize("T,K,V", [(1, 16, 32), (15, 16, 32), (100, 16, 32), (70, 64, 16)])
def test_chunk_torch_fp64(T, K, V):
    inputs, upstream = make_inputs(2, T, 2, K, V, num_states=2, seed=T)
    assert_matches(run(chunk_kda_torch, inputs, upstream, torch.float64, "cpu"), reference(inputs, upstream), 1e-10)


@pytest.mark.parametrize("gates", ["normal", "mixed", "extreme", "aligned"])
def test_chunk_torch_fp32_cu_seqlens(gates):
    inputs, upstream = make_inputs(1, 78, 2, 16, 32, num_states=4, gates=gates)
    expected = reference(inputs, upstream, CU_SEQLENS)
    assert_matches(run(chunk_kda_torch, inputs, upstream, torch.float32, "cpu", CU_SEQLENS), expected, FP32_TOL)


def test_chunk_torch_bf16():
    inputs, upstream = make_inputs(1, 70, 1, 32, 32, num_states=1)
    actual = run(chunk_kda_torch, inputs, upstream, torch.bfloat16, "cpu")
    expected = run(naive_kda, {n: x.bfloat16().double() for n, x in inputs.items()}, upstream, torch.float64, "cpu")
    assert_matches(actual, expected, 2e-2)


def test_extreme_gates_never_overflow():
    """Every decay the chunked path exponentiates is <= 1: gates of e^-100 next to gates of one, over chunks
    whose cumulative decay reaches e^-6000, give finite outputs and gradients (assert_matches checks both)
    in fp32, where exp of +88 would already be infinite."""
    inputs, upstream = make_inputs(1, 130, 1, 16, 16, num_states=1, gates="mixed", seed=3)
    assert inputs["g"].sum(1).min() < -3000
    assert_matches(run(chunk_kda_torch, inputs, upstream, torch.float32, "cpu"), reference(inputs, upstream), FP32_TOL)


# ---- Triton (compiled on a GPU, TRITON_INTERPRET=1 on the CPU: fp32 only there) ----------------------

@pytest.mark.gpu
@pytest.mark.usefixtures("nan_buffers")
def test_triton_chunk_fp32_batch_and_heads():
    """Rows of a batch (no cu_seqlens) of 20 tokens (two sub-chunks), two heads, K = 32 (the sub-chunk kernels'
    key block), gates of e^-20 and below."""
    inputs, upstream = make_inputs(2, 20, 2, 32, 16, num_states=2, gates="extreme", seed=1)
    assert_matches(run(triton_chunk, inputs, upstream, torch.float32, DEVICE), reference(inputs, upstream), FP32_TOL)


def fused_recurrent_forward(inputs: dict, cu_seqlens=None) -> dict:
    """o and the final state of the Triton decode kernel in fp32 (its backward is the chunk kernels')."""
    o, final = triton_fused_recurrent(*(inputs[n].float().to(DEVICE) for n in NAMES),
                                      initial_state=inputs["initial_state"].float().to(DEVICE),
                                      output_final_state=True,
                                      cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(DEVICE))
    return dict(o=o.double().cpu(), final_state=final.double().cpu())


@pytest.mark.gpu
@pytest.mark.usefixtures("nan_buffers")
def test_triton_fused_recurrent_rows():
    """The decode kernel over the rows of a batch, two heads (packed documents: packed_case)."""
    inputs, upstream = make_inputs(2, 37, 2, 16, 32, num_states=2, gates="mixed")
    expected = {n: x for n, x in reference(inputs, upstream).items() if n in ("o", "final_state")}
    assert_matches(fused_recurrent_forward(inputs), expected, FP32_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_steps_continue_the_chunk_forward(backend, monkeypatch):
    """A prompt through the chunked op, then one token at a time through the decode step (fused recurrent,
    T = 1) from the cached state: the outputs and the final state of one chunked call over everything."""
    monkeypatch.setenv("BATON_KERNELS", backend)
    inputs, _ = make_inputs(2, 24, 2, 16, 16, num_states=2, seed=5)
    q, k, v, g, beta, h0 = (inputs[n].float().to(DEVICE) for n in (*NAMES, "initial_state"))
    o, final = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    prompt = 17
    o_prompt, state = chunk_kda(q[:, :prompt], k[:, :prompt], v[:, :prompt], g[:, :prompt], beta[:, :prompt],
                                initial_state=h0, output_final_state=True)
    outputs = [o_prompt]
    for t in range(prompt, 24):
        step = slice(t, t + 1)
        o_t, state = fused_recurrent_kda(q[:, step], k[:, step], v[:, step], g[:, step], beta[:, step],
                                         initial_state=state, output_final_state=True)
        outputs.append(o_t)
    torch.testing.assert_close(torch.cat(outputs, 1), o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, final, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("from_state", [False, True], ids=["zero_state", "initial_state"])
def test_vjp_is_the_backward(from_state):
    """chunk_kda_vjp (the backward alone, for recomputation around the scan) against autograd through the
    reference, from a zero state or from a given one (whose gradient it returns, as sequence parallelism needs)."""
    inputs, upstream = make_inputs(1, 37, 1, 16, 16, num_states=1, seed=2)
    names = (*NAMES, "initial_state") if from_state else NAMES
    leaves = {n: inputs[n].clone().requires_grad_() for n in names}
    o = naive_kda(*(leaves[n] for n in NAMES), initial_state=leaves.get("initial_state"))[0]
    expected = torch.autograd.grad((o * upstream["o"]).sum(), list(leaves.values()))
    state = inputs["initial_state"].float().to(DEVICE) if from_state else None
    dq, dk, dv, (dg, dbeta), d_initial = chunk_kda_vjp(*(inputs[n].float().to(DEVICE) for n in NAMES),
                                                       upstream["o"].float().to(DEVICE), initial_state=state)
    actual = (dq, dk, dv, dg, dbeta, d_initial) if from_state else (dq, dk, dv, dg, dbeta)
    assert d_initial is None or from_state  # no initial state given, none to differentiate
    assert_matches({n: x.double().cpu() for n, x in zip(names, actual)}, dict(zip(names, expected)), FP32_TOL)


def kda_autotuners() -> list:
    """The autotuned kernels of KDA's Triton modules."""
    import kernels.kda.fused_recurrent  # noqa: F401  (imports triton_chunk and triton_wy too)
    return [tuner for tuner in AUTOTUNERS if tuner.base_fn.__module__.startswith("kernels.kda.")]


def test_every_kda_kernel_has_few_candidates():
    tuners = kda_autotuners()
    assert {tuner.base_fn.__name__ for tuner in tuners} == {
        "_intra_kernel", "_wy_kernel", "_bwd_v_kernel", "_bwd_q_kernel", "_bwd_k_kernel", "_bwd_wy_kernel",
        "_bwd_intra_kernel", "_fused_recurrent_kernel"}
    assert all(1 <= len(tuner.candidates) <= 3 for tuner in tuners)
    assert not [tuner for tuner in tuners if {"T", "B"} & set(tuner.keys)]  # never tuned per length


def packed_case(cu_seqlens: torch.Tensor, index: int | None = None) -> tuple[dict, dict]:
    """(Triton results in fp32, the fp64 reference's) on packed documents with initial and final states: the
    chunk op through the entry point (chunk_kda), forward and every gradient, and the decode kernel's forward;
    every autotuned kernel on its candidate `index` when given."""
    inputs, upstream = make_inputs(1, int(cu_seqlens[-1]), 1, 16, 32, num_states=len(cu_seqlens) - 1, gates="mixed")
    expected = reference(inputs, upstream, cu_seqlens)
    with pinned_config(index) if index is not None else contextlib.nullcontext():
        actual = {f"chunk:{n}": x for n, x in run(chunk_kda, inputs, upstream, torch.float32, DEVICE,
                                                  cu_seqlens).items()}
        actual.update({f"recurrent:{n}": x for n, x in fused_recurrent_forward(inputs, cu_seqlens).items()})
    return actual, {**{f"chunk:{n}": x for n, x in expected.items()},
                    **{f"recurrent:{n}": expected[n] for n in ("o", "final_state")}}


@pytest.mark.gpu
@pytest.mark.usefixtures("nan_buffers", "triton_backend")
@pytest.mark.parametrize("index", range(3))
def test_every_candidate_matches_the_reference(index):
    """Any candidate may win the autotuning on some GPU, so every one must be right (the interpreter would
    otherwise run only the first)."""
    assert max(len(tuner.candidates) for tuner in kda_autotuners()) == 3
    assert_matches(*packed_case(CU_SEQLENS, index), FP32_TOL)


@pytest.mark.gpu
@pytest.mark.usefixtures("triton_backend")
def test_every_kernel_gives_the_same_result_when_launched_twice():
    """The autotuner launches each candidate many times on the same arguments: a kernel that rewrote a buffer
    it reads would return something else the second time (tests/kernels/test_triton_launches.py)."""
    from test_triton_launches import every_launch_twice
    with every_launch_twice() as differences:
        assert_matches(*packed_case(SHORT_CU_SEQLENS), FP32_TOL)
    assert set(differences) == {
        "chunk_cumsum_kernel", "_intra_kernel", "_wy_kernel", "state_fwd_kernel", "output_kernel", "state_bwd_kernel",
        "_bwd_v_kernel", "_bwd_q_kernel", "_bwd_k_kernel", "_bwd_wy_kernel", "_bwd_intra_kernel", "_bwd_dg_kernel",
        "_fused_recurrent_kernel"}  # every forward and backward kernel ran
    assert not {name: args for name, args in differences.items() if args}, differences


# ---- the state summary (sequence parallelism) and the contract -------------------------------------

@pytest.mark.parametrize("cu_seqlens", [None, CU_SEQLENS], ids=["rows", "cu_seqlens"])
def test_state_summary_matches_naive_fp64(cu_seqlens, nan_buffers):
    """kda_state_summary's (S_local, M): the op's final state from any S_0 is M S_0 + S_local, forward and
    every gradient, against the naive loop from zero and from S_0."""
    B = 2 if cu_seqlens is None else 1
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    inputs, _ = make_inputs(B, 78, 2, 8, 6, num_states=N, seed=4)
    gen = torch.Generator().manual_seed(1)
    initial, *upstream = (torch.randn(N, 2, 8, 6, generator=gen, dtype=torch.float64) for _ in range(3))

    def final_states(use_summary: bool) -> dict:
        leaves = {n: inputs[n].clone().requires_grad_() for n in NAMES}
        start = initial.clone().requires_grad_()
        if use_summary:
            from_zero, transition = kda_state_summary(*(leaves[n] for n in NAMES[1:]), cu_seqlens=cu_seqlens)
            assert transition.shape == (N, 2, 8, 8)
            from_initial = transition @ start + from_zero
        else:
            def final(state):
                return naive_kda(*leaves.values(), initial_state=state, output_final_state=True,
                                 cu_seqlens=cu_seqlens)[1]
            from_zero, from_initial = final(torch.zeros_like(start)), final(start)
        ((from_zero * upstream[0]).sum() + (from_initial * upstream[1]).sum()).backward()
        grads = {f"d{n}": leaves[n].grad for n in NAMES[1:]}
        return dict(from_zero=from_zero.detach(), from_initial=from_initial.detach(), dinitial=start.grad, **grads)

    assert_matches(final_states(True), final_states(False), 1e-10)


def test_state_passing_equals_one_long_call():
    """Splitting a sequence and carrying final_state into initial_state is the same computation (what
    decoding and sequence parallelism rely on)."""
    inputs, _ = make_inputs(1, 150, 2, 16, 16, num_states=1)
    q, k, v, g, beta, h0 = (inputs[n] for n in (*NAMES, "initial_state"))
    o, final = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o1, mid = chunk_kda(q[:, :90], k[:, :90], v[:, :90], g[:, :90], beta[:, :90], initial_state=h0,
                        output_final_state=True)
    o2, final2 = fused_recurrent_kda(q[:, 90:], k[:, 90:], v[:, 90:], g[:, 90:], beta[:, 90:], initial_state=mid,
                                     output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final2, final, rtol=1e-10, atol=1e-10)


def test_no_final_state_unless_asked():
    inputs, _ = make_inputs(1, 20, 1, 16, 16, num_states=1)
    o, final = chunk_kda(*(inputs[n] for n in NAMES))
    assert final is None and o.shape == inputs["v"].shape


@pytest.mark.parametrize("bad, message", [
    (dict(g=torch.zeros(1, 8, 2)), "g must be"),
    (dict(beta=torch.zeros(1, 8, 2, 16)), "beta must be"),
    (dict(v=torch.zeros(1, 9, 2, 16)), "v must be"),
    (dict(initial_state=torch.zeros(2, 2, 16, 16)), "initial_state must be"),
    (dict(cu_seqlens=torch.tensor([0, 3, 9], dtype=torch.int32)), "cu_seqlens must rise"),
])
@pytest.mark.parametrize("op", [chunk_kda, fused_recurrent_kda])
def test_bad_input_is_a_clear_error(op, bad, message):
    args = dict(q=torch.zeros(1, 8, 2, 16), k=torch.zeros(1, 8, 2, 16), v=torch.zeros(1, 8, 2, 16),
                g=torch.zeros(1, 8, 2, 16), beta=torch.zeros(1, 8, 2), initial_state=None, cu_seqlens=None)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        op(**args)
