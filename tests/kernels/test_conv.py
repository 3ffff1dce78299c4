"""causal_conv1d against the naive loop over time, forward and every gradient.

Inputs are fp64, so both implementations are exact up to summation order: tolerance 1e-12.
"""
import pytest
import torch

from kernels import causal_conv1d
from kernels.conv.naive import naive_causal_conv1d


def run(fn, inputs, upstream, cu_seqlens=None, activation="silu"):
    leaves = {n: x.detach().clone().requires_grad_() for n, x in inputs.items() if x is not None}
    y, final = fn(leaves["x"], leaves["weight"], leaves.get("bias"), activation, leaves.get("initial_state"),
                  output_final_state=True, cu_seqlens=cu_seqlens)
    ((y * upstream["y"]).sum() + (final * upstream["final_state"]).sum()).backward()
    return {"y": y, "final_state": final, **{f"d{n}": x.grad for n, x in leaves.items()}}


def make_inputs(B, T, D, W, N, bias=True, state=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    inputs = dict(x=rand(B, T, D), weight=rand(D, W), bias=rand(D) if bias else None,
                  initial_state=rand(N, D, W - 1) if state else None)
    return inputs, dict(y=rand(B, T, D), final_state=rand(N, D, W - 1))


def assert_all_close(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("T", [1, 2, 15, 64])
@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("bias,state,activation", [(True, True, "silu"), (False, False, None)])
def test_rows(T, W, bias, state, activation):
    inputs, upstream = make_inputs(2, T, 8, W, 2, bias, state, seed=T * W)
    assert_all_close(run(causal_conv1d, inputs, upstream, activation=activation),
                     run(naive_causal_conv1d, inputs, upstream, activation=activation))


@pytest.mark.parametrize("W", [2, 4])
def test_documents_never_mix(W):
    cu_seqlens = torch.tensor([0, 1, 3, 3, 20, 21, 40], dtype=torch.int32)  # shorter than W-1, and empty
    inputs, upstream = make_inputs(1, 40, 8, W, 6, seed=W)
    assert_all_close(run(causal_conv1d, inputs, upstream, cu_seqlens),
                     run(naive_causal_conv1d, inputs, upstream, cu_seqlens))
    # A document's output does not change when another document's tokens change.
    x = inputs["x"].clone()
    y, _ = causal_conv1d(x, inputs["weight"], cu_seqlens=cu_seqlens)
    x[:, 3:20] = 100.0
    y_changed, _ = causal_conv1d(x, inputs["weight"], cu_seqlens=cu_seqlens)
    torch.testing.assert_close(y_changed[:, 20:], y[:, 20:])
    torch.testing.assert_close(y_changed[:, :3], y[:, :3])


def test_state_is_the_last_inputs_and_decoding_continues():
    inputs, _ = make_inputs(1, 10, 4, 4, 1, state=False)
    x, weight, bias = inputs["x"], inputs["weight"], inputs["bias"]
    y, state = causal_conv1d(x, weight, bias, "silu", output_final_state=True)
    torch.testing.assert_close(state, x[0, -3:].T.unsqueeze(0))
    _, short_state = causal_conv1d(x[:, :2], weight, output_final_state=True)  # zero-padded on the left
    torch.testing.assert_close(short_state[0], torch.cat([torch.zeros(4, 1, dtype=x.dtype), x[0, :2].T], 1))
    state = None
    for t in range(10):  # token by token, carrying the state
        y_t, state = causal_conv1d(x[:, t:t + 1], weight, bias, "silu", initial_state=state, output_final_state=True)
        torch.testing.assert_close(y_t, y[:, t:t + 1])


def test_bf16_keeps_dtype():
    x = torch.randn(2, 9, 8, dtype=torch.bfloat16)
    weight = torch.randn(8, 4, dtype=torch.bfloat16)
    y, state = causal_conv1d(x, weight, activation="silu", output_final_state=True)
    expected, _ = naive_causal_conv1d(x.double(), weight.double(), activation="silu")
    assert y.dtype == state.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight=torch.zeros(3, 4)), "weight must be"),
    (dict(bias=torch.zeros(3)), "bias must be"),
    (dict(activation="relu"), "activation must be"),
    (dict(initial_state=torch.zeros(2, 8, 2)), "initial_state must be"),
])
def test_bad_input_is_a_clear_error(kwargs, message):
    args = dict(x=torch.zeros(2, 5, 8), weight=torch.zeros(8, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        causal_conv1d(**args)
