"""Every path of the diagonal scan h_t = a_t h_{t-1} + b_t against the naive loop, forward and every gradient.

The reference is naive_diagonal_scan in fp64 with autograd; errors are max|actual - expected| / max|expected| per
tensor (h, the final state, d a, d b, d initial_state; random upstream gradients for h and the final state).
a_t is signed: uniform in (-1, 1), long memory of either sign (|a| in (0.97, 1)), and a mix of exact zeros (a
cut state), tiny values and |a| up to 1.05 (a growing state). Tolerances: fp64 1e-10 (only the order of the
products differs); fp32 2e-4 (chunked PyTorch, and Triton under TRITON_INTERPRET=1; the Triton kernels have no
dots, so the same on a GPU); bf16 b on a GPU 2e-2.
"""
import os

import pytest
import torch

from compare import assert_matches
from inputs import (CU_SEQLENS, PACKED_T, TRITON_LENGTHS, NUM_DOCS, diagonal_scan_inputs as make_inputs,
                    diagonal_scan_triton_chunk as triton_chunk,
                    diagonal_scan_triton_fused_recurrent as triton_fused_recurrent, run_scan)
from kernels import chunk_diagonal_scan, diagonal_scan_state_summary, fused_recurrent_diagonal_scan
from kernels.diagonal_scan.chunk import chunk_diagonal_scan_torch
from kernels.diagonal_scan.naive import naive_diagonal_scan

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GATES = ["signed", "long", "mixed"]


def reference(inputs, upstream, cu_seqlens=None):
    return run_scan(naive_diagonal_scan, inputs, upstream, torch.float64, "cpu", cu_seqlens)


# ---- chunked PyTorch (the CPU path) ----------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 15, 64, 100, 257])
@pytest.mark.parametrize("gates", GATES)
def test_chunk_torch_fp64(T, gates):
    inputs, upstream = make_inputs(2, T, 2, 24, num_states=2, gates=gates, seed=T)
    assert_matches(run_scan(chunk_diagonal_scan_torch, inputs, upstream, torch.float64), reference(inputs, upstream),
                   1e-10)


@pytest.mark.usefixtures("nan_buffers")
@pytest.mark.parametrize("gates", GATES)
def test_chunk_torch_fp32_cu_seqlens(gates):
    """Packed documents: one shorter than a chunk, an empty one (final state = initial state), a single token,
    two over several chunks."""
    inputs, upstream = make_inputs(1, PACKED_T, 2, 16, num_states=NUM_DOCS, gates=gates)
    expected = reference(inputs, upstream, CU_SEQLENS)
    assert_matches(run_scan(chunk_diagonal_scan_torch, inputs, upstream, torch.float32, cu_seqlens=CU_SEQLENS),
                   expected, 2e-4)
    assert torch.equal(expected["final_state"][2], inputs["initial_state"][2])  # the empty document


def test_chunk_torch_without_initial_state():
    inputs, upstream = make_inputs(2, 100, 1, 8, num_states=2)
    inputs["initial_state"] = None
    actual = run_scan(chunk_diagonal_scan_torch, inputs, upstream, torch.float64)
    assert "dinitial_state" not in actual
    assert_matches(actual, reference(inputs, upstream), 1e-10)


def test_chunk_torch_bf16_inputs():
    """bf16 a and b: fp32 accumulation and state, h in bf16."""
    inputs, upstream = make_inputs(2, 100, 2, 16, num_states=2, gates="long")
    actual = run_scan(chunk_diagonal_scan_torch, inputs, upstream, torch.bfloat16)
    rounded = {n: x.bfloat16().double() for n, x in inputs.items()}
    assert_matches(actual, reference(rounded, upstream), 2e-2)


def test_state_passing_equals_one_long_call():
    """Splitting a sequence and carrying final_state into initial_state is the same computation (what decoding
    and sequence parallelism rely on)."""
    inputs, _ = make_inputs(1, 150, 2, 8, num_states=1, gates="long")
    a, b, h0 = inputs["a"], inputs["b"], inputs["initial_state"]
    h, final = chunk_diagonal_scan(a, b, h0, output_final_state=True)
    h1, mid = chunk_diagonal_scan(a[:, :90], b[:, :90], h0, output_final_state=True)
    h2, final2 = fused_recurrent_diagonal_scan(a[:, 90:], b[:, 90:], mid, output_final_state=True)
    torch.testing.assert_close(torch.cat([h1, h2], 1), h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final2, final, rtol=1e-10, atol=1e-10)


def test_no_final_state_unless_asked():
    inputs, _ = make_inputs(1, 20, 1, 4, num_states=1)
    h, final = chunk_diagonal_scan(inputs["a"], inputs["b"])
    assert final is None and h.shape == inputs["b"].shape


@pytest.mark.parametrize("bad, message", [
    (dict(a=torch.zeros(1, 8, 2, 5)), "a must have"),
    (dict(b=torch.zeros(8, 2, 16), a=torch.zeros(8, 2, 16)), "b must be"),
    (dict(initial_state=torch.zeros(2, 2, 16)), "initial_state must be"),
    (dict(cu_seqlens=torch.tensor([0, 3, 9], dtype=torch.int32)), "cu_seqlens must rise"),
])
def test_bad_input_is_a_clear_error(bad, message):
    args = dict(a=torch.zeros(1, 8, 2, 16), b=torch.zeros(1, 8, 2, 16), initial_state=None, cu_seqlens=None)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        chunk_diagonal_scan(**args)


# ---- the state summary (sequence parallelism) --------------------------------------------------------

@pytest.mark.parametrize("cu_seqlens", [None, CU_SEQLENS], ids=["rows", "documents"])
@pytest.mark.parametrize("gates", GATES)
def test_summary_gives_the_final_state_from_any_initial_state(cu_seqlens, gates):
    """A * h_0 + h_local is the final state from h_0 (and h_local the one from zero), forward and every gradient."""
    B, T = (2, 131) if cu_seqlens is None else (1, PACKED_T)
    N = B if cu_seqlens is None else NUM_DOCS
    inputs, _ = make_inputs(B, T, 2, 8, num_states=N, gates=gates)
    gen = torch.Generator().manual_seed(1)
    upstream = [torch.randn(N, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2)]

    def final_states(use_summary):
        a, b, h0 = (inputs[n].clone().requires_grad_() for n in ("a", "b", "initial_state"))
        if use_summary:
            local, transition = diagonal_scan_state_summary(a, b, cu_seqlens)
            from_zero, from_initial = local, transition * h0 + local
        else:
            run = lambda state: naive_diagonal_scan(a, b, state, True, cu_seqlens)[1]  # noqa: E731
            from_zero, from_initial = run(None), run(h0)
        ((from_zero * upstream[0]).sum() + (from_initial * upstream[1]).sum()).backward()
        return dict(from_zero=from_zero, from_initial=from_initial, da=a.grad, db=b.grad, dinitial_state=h0.grad)

    assert_matches({n: t.detach() for n, t in final_states(True).items()},
                   {n: t.detach() for n, t in final_states(False).items()}, 1e-10)


def test_summary_transition_is_the_product_with_its_sign():
    """A is prod a, signs kept, in fp32 for fp32 inputs; a zero anywhere in a sequence makes it zero."""
    a = torch.full((2, 3, 1, 3), -0.9)
    a[..., 1] = 0.95
    a[1, 1, 0, 2] = 0.0
    _, transition = diagonal_scan_state_summary(a, torch.zeros_like(a))
    assert transition.dtype == torch.float32
    torch.testing.assert_close(transition[0, 0], torch.tensor([-0.729, 0.95 ** 3, -0.729]))
    torch.testing.assert_close(transition[1, 0], torch.tensor([-0.729, 0.95 ** 3, 0.0]))


# ---- Triton (compiled on a GPU, TRITON_INTERPRET=1 on the CPU) -------------------------------------

TRITON_PATHS = [pytest.param(triton_chunk, id="triton_chunk"),
                pytest.param(triton_fused_recurrent, id="triton_fused_recurrent")]


# (rows, channels) by length: a ragged channel block (24), more than one block (80), rows side by side once.
ROWS_AND_CHANNELS = {1: (1, 24), 15: (1, 24), 64: (1, 80), 100: (2, 24), 257: (1, 24)}


@pytest.mark.gpu
@pytest.mark.usefixtures("nan_buffers")
@pytest.mark.parametrize("T", TRITON_LENGTHS)
@pytest.mark.parametrize("path", TRITON_PATHS)
def test_triton(path, T):
    B, D = ROWS_AND_CHANNELS[T]
    inputs, upstream = make_inputs(B, T, 1, D, num_states=B, gates="signed", seed=T)
    assert_matches(run_scan(path, inputs, upstream, torch.float32, DEVICE), reference(inputs, upstream), 2e-4)


@pytest.mark.gpu
@pytest.mark.usefixtures("nan_buffers")
@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("path", TRITON_PATHS)
def test_triton_cu_seqlens(path, gates):
    heads = 2 if gates == "mixed" else 1  # two heads once: the interpreter runs every program in turn
    inputs, upstream = make_inputs(1, PACKED_T, heads, 16, num_states=NUM_DOCS, gates=gates)
    expected = reference(inputs, upstream, CU_SEQLENS)
    assert_matches(run_scan(path, inputs, upstream, torch.float32, DEVICE, CU_SEQLENS), expected, 2e-4)


@pytest.mark.gpu
@pytest.mark.usefixtures("nan_buffers")
def test_triton_without_initial_state():
    inputs, upstream = make_inputs(1, 100, 1, 16, num_states=1)
    inputs["initial_state"] = None
    actual = run_scan(triton_chunk, inputs, upstream, torch.float32, DEVICE)
    assert "dinitial_state" not in actual
    assert_matches(actual, reference(inputs, upstream), 2e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="bf16 Triton needs a GPU (the interpreter runs fp32 here)")
def test_triton_bf16():
    inputs, upstream = make_inputs(2, 257, 2, 64, num_states=2, gates="long")
    actual = run_scan(triton_chunk, inputs, upstream, torch.bfloat16, DEVICE)
    rounded = {n: x.bfloat16().double() for n, x in inputs.items()}
    assert_matches(actual, reference(rounded, upstream), 2e-2)


@pytest.mark.gpu
def test_entry_point_takes_triton_when_forced(monkeypatch):
    """BATON_KERNELS=triton routes the public entry point to the Triton kernels (interpreted on CPU)."""
    monkeypatch.setenv("BATON_KERNELS", "triton")
    if not CUDA:
        assert os.environ.get("TRITON_INTERPRET") == "1"
    import kernels.diagonal_scan.triton_scan as triton_module
    calls = []
    original = triton_module.diagonal_scan_op
    monkeypatch.setattr(triton_module, "diagonal_scan_op", lambda *args: calls.append(1) or original(*args))
    inputs, _ = make_inputs(1, 20, 1, 16, num_states=1)
    a, b = inputs["a"].float().to(DEVICE), inputs["b"].float().to(DEVICE)
    h, _ = chunk_diagonal_scan(a, b)
    assert calls == [1]
    torch.testing.assert_close(h, naive_diagonal_scan(a, b)[0], rtol=2e-4, atol=2e-4)


def test_core_form_is_the_scan_of_k_times_v_with_column_states():
    """The recurrent cores' form (q ignored, states [N, H, D, 1]): its summary composes like the other cores'
    (a diagonal transition [N, H, D] scaling the state's rows) to its final state from any initial state."""
    from kernels.diagonal_scan.core_form import (chunk_diagonal_scan_kv, diagonal_scan_kv_state_summary,
                                                 fused_recurrent_diagonal_scan_kv)
    inputs, _ = make_inputs(1, PACKED_T, 2, 8, num_states=NUM_DOCS, gates="long")
    a, v, h0 = inputs["a"], inputs["b"], inputs["initial_state"].unsqueeze(-1)
    k = torch.rand_like(v)
    o, final = chunk_diagonal_scan_kv(None, k, v, a, initial_state=h0, output_final_state=True, cu_seqlens=CU_SEQLENS)
    expected_o, expected_final = naive_diagonal_scan(a, k * v, h0[..., 0], True, CU_SEQLENS)
    torch.testing.assert_close(o, expected_o)
    assert final.shape == (NUM_DOCS, 2, 8, 1)
    torch.testing.assert_close(final[..., 0], expected_final)
    local, transition = diagonal_scan_kv_state_summary(k, v, a, CU_SEQLENS)
    assert local.shape == (NUM_DOCS, 2, 8, 1) and transition.shape == (NUM_DOCS, 2, 8)
    torch.testing.assert_close(transition.unsqueeze(-1) * h0 + local, final)
    step, _ = fused_recurrent_diagonal_scan_kv(None, k[:, :5], v[:, :5], a[:, :5], initial_state=h0[:1])
    torch.testing.assert_close(step, o[:, :5])
