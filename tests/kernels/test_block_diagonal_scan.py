"""Every path of the block-diagonal scan h_t = A_t h_{t-1} + b_t (a 2x2 block per channel) against the naive loop,
forward and every gradient.

The reference is naive_block_diagonal_scan in fp64 with autograd; errors are max|actual - expected| / max|expected|
per tensor (h, the final state, d a, d b, d initial_state; random upstream gradients for h and the final state).
Blocks: random entries of either sign, scaled rotations and reflections (long memory that turns and flips), and a
mix of zero, rank-one, tiny, triangular and growing blocks (inputs.block_diagonal_scan_inputs). Tolerances: fp64
1e-10; fp32 2e-4 (chunked PyTorch, and Triton under TRITON_INTERPRET=1; the kernels have no dots). The Triton
cases are kept small (the interpreter runs every program in turn): channel blocks of 16 over 20 channels (two
blocks, the second ragged). Packed documents (this file's CU_SEQLENS, with mixed blocks and NaN-filled fresh
buffers) through both Triton paths, for every autotune candidate, and every kernel launched twice, are in
test_triton_launches.py.
"""
import pytest
import torch

from compare import assert_matches
from inputs import (block_diagonal_scan_inputs as make_inputs, block_diagonal_scan_triton_chunk as triton_chunk,
                    block_diagonal_scan_triton_fused_recurrent as triton_fused_recurrent, run_scan)
from kernels.block_diagonal_scan import (block_diagonal_scan_state_summary, chunk_block_diagonal_scan,
                                         combine_block_diagonal_states, fused_recurrent_block_diagonal_scan)
from kernels.block_diagonal_scan.chunk import chunk_block_diagonal_scan_torch
from kernels.block_diagonal_scan.naive import naive_block_diagonal_scan

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GATES = ["signed", "long", "mixed"]
# Uneven documents, none aligned with the 64-token chunks: one of 5 tokens, one over a chunk boundary, an empty one
# (its final state is its initial state), a single token, and one of 79.
CU_SEQLENS = torch.tensor([0, 5, 70, 70, 71, 150], dtype=torch.int32)
NUM_DOCS = len(CU_SEQLENS) - 1


def reference(inputs, upstream, cu_seqlens=None):
    return run_scan(naive_block_diagonal_scan, inputs, upstream, torch.float64, "cpu", cu_seqlens)


# ---- chunked PyTorch (the CPU path) ----------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 15, 64, 100, 257])
@pytest.mark.parametrize("gates", GATES)
def test_chunk_torch_fp64(T, gates):
    inputs, upstream = make_inputs(2, T, 2, 6, num_states=2, gates=gates, seed=T)
    assert_matches(run_scan(chunk_block_diagonal_scan_torch, inputs, upstream, torch.float64),
                   reference(inputs, upstream), 1e-10)


@pytest.mark.usefixtures("nan_buffers")
@pytest.mark.parametrize("gates", GATES)
def test_chunk_torch_fp32_cu_seqlens(gates):
    inputs, upstream = make_inputs(1, 150, 2, 8, num_states=NUM_DOCS, gates=gates)
    expected = reference(inputs, upstream, CU_SEQLENS)
    assert_matches(run_scan(chunk_block_diagonal_scan_torch, inputs, upstream, torch.float32, cu_seqlens=CU_SEQLENS),
                   expected, 2e-4)
    assert torch.equal(expected["final_state"][2], inputs["initial_state"][2])  # the empty document


def test_chunk_torch_without_initial_state():
    inputs, upstream = make_inputs(2, 100, 1, 4, num_states=2)
    inputs["initial_state"] = None
    actual = run_scan(chunk_block_diagonal_scan_torch, inputs, upstream, torch.float64)
    assert "dinitial_state" not in actual
    assert_matches(actual, reference(inputs, upstream), 1e-10)


def test_chunk_torch_bf16_inputs():
    """bf16 a and b: fp32 accumulation and state, h in bf16."""
    inputs, upstream = make_inputs(2, 100, 2, 8, num_states=2, gates="long")
    actual = run_scan(chunk_block_diagonal_scan_torch, inputs, upstream, torch.bfloat16)
    rounded = {n: x.bfloat16().double() for n, x in inputs.items()}
    assert_matches(actual, reference(rounded, upstream), 2e-2)


def test_a_diagonal_block_is_the_diagonal_scan():
    """Blocks diag(a, a'): two independent diagonal scans."""
    from kernels.diagonal_scan.naive import naive_diagonal_scan
    inputs, _ = make_inputs(1, 90, 2, 4, num_states=1)
    a = torch.diag_embed(inputs["a"].diagonal(dim1=-2, dim2=-1))
    h, final = chunk_block_diagonal_scan(a, inputs["b"], inputs["initial_state"], output_final_state=True)
    for i in range(2):
        expected, expected_final = naive_diagonal_scan(a[..., i, i], inputs["b"][..., i],
                                                       inputs["initial_state"][..., i], True)
        torch.testing.assert_close(h[..., i], expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(final[..., i], expected_final, rtol=1e-12, atol=1e-12)


def test_state_passing_equals_one_long_call():
    """Splitting a sequence and carrying final_state into initial_state is the same computation (what decoding
    and sequence parallelism rely on)."""
    inputs, _ = make_inputs(1, 150, 2, 4, num_states=1, gates="long")
    a, b, h0 = inputs["a"], inputs["b"], inputs["initial_state"]
    h, final = chunk_block_diagonal_scan(a, b, h0, output_final_state=True)
    h1, mid = chunk_block_diagonal_scan(a[:, :90], b[:, :90], h0, output_final_state=True)
    h2, final2 = fused_recurrent_block_diagonal_scan(a[:, 90:], b[:, 90:], mid, output_final_state=True)
    torch.testing.assert_close(torch.cat([h1, h2], 1), h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final2, final, rtol=1e-10, atol=1e-10)


def test_no_final_state_unless_asked():
    inputs, _ = make_inputs(1, 20, 1, 4, num_states=1)
    h, final = chunk_block_diagonal_scan(inputs["a"], inputs["b"])
    assert final is None and h.shape == inputs["b"].shape


@pytest.mark.parametrize("bad, message", [
    (dict(a=torch.zeros(1, 8, 2, 16, 2)), "a must be"),
    (dict(b=torch.zeros(1, 8, 2, 16)), "b must be"),
    (dict(initial_state=torch.zeros(2, 2, 16, 2)), "initial_state must be"),
    (dict(cu_seqlens=torch.tensor([0, 3, 9], dtype=torch.int32)), "cu_seqlens must rise"),
])
def test_bad_input_is_a_clear_error(bad, message):
    args = dict(a=torch.zeros(1, 8, 2, 16, 2, 2), b=torch.zeros(1, 8, 2, 16, 2), initial_state=None, cu_seqlens=None)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        chunk_block_diagonal_scan(**args)


# ---- the state summary and combine (sequence parallelism) ---------------------------------------------

@pytest.mark.parametrize("cu_seqlens", [None, CU_SEQLENS], ids=["rows", "documents"])
@pytest.mark.parametrize("gates", GATES)
def test_summary_gives_the_final_state_from_any_initial_state(cu_seqlens, gates):
    """combine(M, h_local, h_0) is the final state from h_0 (and h_local the one from zero), forward and every
    gradient."""
    B, T = (2, 131) if cu_seqlens is None else (1, 150)
    N = B if cu_seqlens is None else NUM_DOCS
    inputs, _ = make_inputs(B, T, 2, 4, num_states=N, gates=gates)
    gen = torch.Generator().manual_seed(1)
    upstream = [torch.randn(N, 2, 4, 2, generator=gen, dtype=torch.float64) for _ in range(2)]

    def final_states(use_summary):
        a, b, h0 = (inputs[n].clone().requires_grad_() for n in ("a", "b", "initial_state"))
        if use_summary:
            local, transition = block_diagonal_scan_state_summary(a, b, cu_seqlens)
            from_zero, from_initial = local, combine_block_diagonal_states(transition, local, h0)
        else:
            run = lambda state: naive_block_diagonal_scan(a, b, state, True, cu_seqlens)[1]  # noqa: E731
            from_zero, from_initial = run(None), run(h0)
        ((from_zero * upstream[0]).sum() + (from_initial * upstream[1]).sum()).backward()
        return dict(from_zero=from_zero, from_initial=from_initial, da=a.grad, db=b.grad, dinitial_state=h0.grad)

    assert_matches({n: t.detach() for n, t in final_states(True).items()},
                   {n: t.detach() for n, t in final_states(False).items()}, 1e-10)


def test_summary_transition_is_the_ordered_product():
    """M = A_last ... A_first (not the reverse order: the blocks do not commute); an empty sequence gives I."""
    a = torch.tensor([[[1.0, 2.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]], [[0.5, 0.0], [0.0, 3.0]]])
    a = a.view(1, 3, 1, 1, 2, 2)
    _, transition = block_diagonal_scan_state_summary(a, torch.zeros(1, 3, 1, 1, 2))
    torch.testing.assert_close(transition[0, 0, 0], a[0, 2, 0, 0] @ a[0, 1, 0, 0] @ a[0, 0, 0, 0])
    _, empty = block_diagonal_scan_state_summary(a, torch.zeros(1, 3, 1, 1, 2), torch.tensor([0, 0, 3]))
    torch.testing.assert_close(empty[0, 0, 0], torch.eye(2))


# ---- Triton (compiled on a GPU, TRITON_INTERPRET=1 on the CPU) -------------------------------------

TRITON_PATHS = [pytest.param(triton_chunk, id="triton_chunk"),
                pytest.param(triton_fused_recurrent, id="triton_fused_recurrent")]


@pytest.mark.gpu
@pytest.mark.usefixtures("nan_buffers")
@pytest.mark.parametrize("path", TRITON_PATHS)
def test_triton_rows(path):
    """Two rows of 70 tokens (a chunk and a ragged one) side by side, 20 channels (a ragged channel block)."""
    inputs, upstream = make_inputs(2, 70, 1, 20, num_states=2, gates="signed", seed=3)
    assert_matches(run_scan(path, inputs, upstream, torch.float32, DEVICE), reference(inputs, upstream), 2e-4)


@pytest.mark.gpu
@pytest.mark.usefixtures("nan_buffers")
def test_triton_without_initial_state():
    inputs, upstream = make_inputs(1, 20, 1, 6, num_states=1, gates="long")
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
    """BATON_KERNELS=triton routes the public entry points to the Triton kernels (interpreted on CPU)."""
    monkeypatch.setenv("BATON_KERNELS", "triton")
    import kernels.block_diagonal_scan.fused_recurrent as fused_module
    import kernels.block_diagonal_scan.triton_scan as triton_module
    calls = []
    original = triton_module.block_diagonal_scan_op
    for module in (triton_module, fused_module):
        monkeypatch.setattr(module, "block_diagonal_scan_op", lambda *args: calls.append(1) or original(*args))
    inputs, _ = make_inputs(1, 9, 1, 4, num_states=1)
    a, b = inputs["a"].float().to(DEVICE), inputs["b"].float().to(DEVICE)
    h, _ = chunk_block_diagonal_scan(a, b)
    step, _ = fused_recurrent_block_diagonal_scan(a, b)
    assert calls == [1, 1]
    expected = naive_block_diagonal_scan(a, b)[0]
    torch.testing.assert_close(h, expected, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(step, expected, rtol=2e-4, atol=2e-4)
