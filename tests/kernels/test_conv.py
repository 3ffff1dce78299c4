"""causal_conv1d against the naive loop over time, forward and every gradient, on both paths.

The PyTorch path runs in fp64, so it matches the loop up to summation order (tolerance 1e-12); the Triton
kernels run in Triton's interpreter in fp32 (they accumulate in fp32 whatever the input). Lengths over 64
tokens and 80 channels give the kernels several token and channel blocks with ragged edges.
Also: the op saves only its input for the backward (bytes per channel per token in bf16), and never syncs
with the host under cu_seqlens.
"""
import pytest
import torch

from kernels import causal_conv1d
from kernels.conv.function import conv_backward, conv_forward
from kernels.conv.naive import naive_causal_conv1d
from inputs import conv_inputs as make_inputs, run_conv as run
from training.host_syncs import HostSyncs

BACKENDS = {"torch": dict(dtype=torch.float64, tol=1e-12), "triton": dict(dtype=torch.float32, tol=2e-5)}


@pytest.fixture(params=list(BACKENDS))
def backend(request, monkeypatch):
    """The path under test (kernels/backend.py's override), with its dtype and tolerance."""
    monkeypatch.setenv("BATON_KERNELS", request.param)
    return BACKENDS[request.param]


def assert_all_close(actual, expected, tol):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=tol, atol=tol, msg=name)


def check_against_naive(backend, inputs, upstream, cu_seqlens=None, activation="silu"):
    assert_all_close(run(causal_conv1d, inputs, upstream, cu_seqlens, activation, backend["dtype"]),
                     run(naive_causal_conv1d, inputs, upstream, cu_seqlens, activation), backend["tol"])


@pytest.mark.usefixtures("nan_buffers")
# Rows shorter than the state (T < W - 1), a width without a state (W=1), and rows over the 64-token block edge
# at the narrowest and widest kernels.
@pytest.mark.parametrize("T,W", [(1, 4), (2, 4), (15, 1), (15, 2), (15, 4), (130, 1), (130, 4)])
@pytest.mark.parametrize("bias,state,activation", [(True, True, "silu"), (False, False, None)])
def test_rows(backend, T, W, bias, state, activation):
    inputs, upstream = make_inputs(2, T, 80, W, 2, bias, state, seed=T * W)
    check_against_naive(backend, inputs, upstream, activation=activation)


# One token, two (shorter than W-1 for W=4), empty, exactly three, one across the 64-token block edge, the rest.
CU_SEQLENS = [0, 1, 3, 3, 6, 70, 71, 150]


@pytest.mark.usefixtures("nan_buffers")
@pytest.mark.parametrize("W,state", [(2, False), (3, True), (4, True), (4, False)])
def test_packed_documents(backend, W, state):
    cu_seqlens = torch.tensor(CU_SEQLENS, dtype=torch.int32)
    inputs, upstream = make_inputs(1, 150, 80, W, len(CU_SEQLENS) - 1, state=state, seed=W)
    check_against_naive(backend, inputs, upstream, cu_seqlens)


@pytest.mark.usefixtures("nan_buffers")
def test_documents_across_backward_blocks(backend):
    """Over 256 tokens: several backward programs (TOKEN_BLOCK), their d weight partial sums added up, and
    short documents at the block edge."""
    cu_seqlens = torch.tensor([0, 250, 255, 257, 258, 300], dtype=torch.int32)
    inputs, upstream = make_inputs(1, 300, 8, 4, 5, seed=1)
    check_against_naive(backend, inputs, upstream, cu_seqlens)


def test_documents_never_mix(backend):
    cu_seqlens = torch.tensor(CU_SEQLENS, dtype=torch.int32)
    inputs, _ = make_inputs(1, 150, 8, 4, len(CU_SEQLENS) - 1)
    x = inputs["x"].to(backend["dtype"])
    weight, state = inputs["weight"].to(x.dtype), inputs["initial_state"].to(x.dtype)
    y, final = causal_conv1d(x, weight, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens)
    changed = x.clone()
    changed[:, 6:70] = 100.0  # the fifth document
    y_changed, final_changed = causal_conv1d(changed, weight, initial_state=state, output_final_state=True,
                                             cu_seqlens=cu_seqlens)
    torch.testing.assert_close(y_changed[:, 70:], y[:, 70:])
    torch.testing.assert_close(y_changed[:, :6], y[:, :6])
    others = [n for n in range(len(CU_SEQLENS) - 1) if n != 4]
    torch.testing.assert_close(final_changed[others], final[others])
    assert not torch.equal(final_changed[4], final[4])
    torch.testing.assert_close(final[2], state[2])  # the empty document passes its state through


def test_state_is_the_last_inputs_and_decoding_continues(backend):
    inputs, _ = make_inputs(1, 10, 4, 4, 1, state=False)
    x, weight, bias = (inputs[n].to(backend["dtype"]) for n in ("x", "weight", "bias"))
    y, state = causal_conv1d(x, weight, bias, "silu", output_final_state=True)
    torch.testing.assert_close(state, x[0, -3:].T.unsqueeze(0))
    _, short_state = causal_conv1d(x[:, :2], weight, output_final_state=True)  # zero-padded on the left
    torch.testing.assert_close(short_state[0], torch.cat([torch.zeros(4, 1, dtype=x.dtype), x[0, :2].T], 1))
    state = None
    for t in range(10):  # token by token (T=1), carrying the state
        y_t, state = causal_conv1d(x[:, t:t + 1], weight, bias, "silu", initial_state=state, output_final_state=True)
        torch.testing.assert_close(y_t, y[:, t:t + 1])


def test_bf16_keeps_dtype(backend):
    x = torch.randn(2, 9, 8, dtype=torch.bfloat16)
    weight = torch.randn(8, 4, dtype=torch.bfloat16)
    y, state = causal_conv1d(x, weight, activation="silu", output_final_state=True)
    expected, _ = naive_causal_conv1d(x.double(), weight.double(), activation="silu")
    assert y.dtype == state.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)


def test_saves_at_most_4_bytes_per_channel_per_token_in_bf16(backend):
    """Everything autograd keeps (x, the fp32 weight, the initial state, cu_seqlens) under bf16 autocast, as
    the model runs it: the bf16 input alone is 2 bytes per channel per token, the rest 0.2 at this length (one
    more bf16 tensor per token would make 4.2)."""
    T, D, W = 256, 32, 4
    cu_seqlens = torch.tensor([0, 100, 101, T], dtype=torch.int32)
    x = torch.randn(1, T, D, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(D, W, requires_grad=True)
    initial_state = torch.randn(3, D, W - 1, requires_grad=True)
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = causal_conv1d(x, weight, None, "silu", initial_state, cu_seqlens=cu_seqlens)
    assert x.untyped_storage().data_ptr() in storages
    assert sum(storages.values()) / (T * D) <= 4
    y.float().sum().backward()  # and the backward still runs from what was kept
    assert x.grad.shape == x.shape and torch.isfinite(weight.grad).all()


def test_no_host_sync_under_cu_seqlens(backend):
    """Forward and backward with packed documents, an initial state and a final-state gradient never read a
    tensor's values on the host."""
    cu_seqlens = torch.tensor(CU_SEQLENS, dtype=torch.int32)
    inputs, upstream = make_inputs(1, 150, 8, 4, len(CU_SEQLENS) - 1)
    with HostSyncs() as syncs:
        run(causal_conv1d, inputs, upstream, cu_seqlens, dtype=backend["dtype"])
    assert syncs.counts == {}


def test_recorder_sees_host_syncs():
    """The check above can fail: .item(), bool(), repeat_interleave with tensor counts and tolist are counted."""
    counts = torch.tensor([1, 2])
    with HostSyncs() as syncs:
        counts[0].item()
        bool(counts[1] > 0)
        torch.repeat_interleave(torch.arange(2), counts)
        counts.tolist()
    assert syncs.total == 4 and syncs.counts["Tensor.tolist"] == 1


def test_torch_path_runs_on_meta_tensors(monkeypatch):
    """Meta tensors have no values at all, so any op that reads one on the host raises: the PyTorch path's
    forward and backward, documents and states included, run on them (called directly: on meta tensors the
    custom op would run its shape-only fake)."""
    monkeypatch.setenv("BATON_KERNELS", "torch")
    cu_seqlens = torch.tensor(CU_SEQLENS, device="meta")
    x = torch.empty(1, 150, 8, device="meta")
    weight, bias = torch.empty(8, 4, device="meta"), torch.empty(8, device="meta")
    state = torch.empty(len(CU_SEQLENS) - 1, 8, 3, device="meta")
    y, final = conv_forward(x, weight, bias, state, cu_seqlens, "silu", True)
    dx, dweight, dbias, dstate = conv_backward(x, weight, bias, state, cu_seqlens, "silu", y, final)
    assert (dx.shape, dweight.shape, dbias.shape, dstate.shape) == (x.shape, weight.shape, bias.shape, state.shape)


@pytest.mark.parametrize("kwargs, message", [
    (dict(x=torch.zeros(2, 0, 8)), "at least one token"),
    (dict(weight=torch.zeros(3, 4)), "weight must be"),
    (dict(bias=torch.zeros(3)), "bias must be"),
    (dict(activation="relu"), "activation must be"),
    (dict(initial_state=torch.zeros(2, 8, 2)), "initial_state must be"),
    (dict(cu_seqlens=torch.tensor([0.0, 5.0])), "cu_seqlens must be an integer"),
    (dict(cu_seqlens=torch.tensor([0, 5])), "batch size must be 1"),
])
def test_bad_input_is_a_clear_error(kwargs, message):
    args = dict(x=torch.zeros(2, 5, 8), weight=torch.zeros(8, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        causal_conv1d(**args)
