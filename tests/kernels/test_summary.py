"""The state-only summaries (sequence parallelism's first pass) against the naive recurrence.

A summary gives, per sequence, S_local (the final state from a zero start) and the transition M, such that
the op's final state from any S_0 is M S_0 + S_local (M diagonal for GLA and Mamba2). Both are checked
against the naive loop over time in fp64 with autograd, from zero and from a random S_0, forward and every
gradient (random upstream gradients for both final states), with odd lengths and packed documents.
"""
import pytest
import torch
import torch.nn.functional as F

from kernels import gated_delta_rule_state_summary, gla_state_summary
from kernels.gated_delta_rule.naive import naive_gated_delta_rule
from kernels.gla.naive import naive_recurrent_gla
from compare import assert_matches

H, K, V = 2, 8, 6
# Documents not aligned with the 64-token chunks: one spanning three chunks, an empty one, a single token.
CU_SEQLENS = torch.tensor([0, 5, 150, 150, 151, 213], dtype=torch.int32)


def make_inputs(op: str, B: int, T: int, gates: str = "normal", seed: int = 0) -> dict:
    """fp64 leaves of one op: 'gla' (vector gate), 'mamba2' (scalar gate) or 'gated_delta_rule'."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    gate_shape = (B, T, H, K) if op == "gla" else (B, T, H)
    # 'strong': decays of up to e^-20 per token, so a document's transition underflows to (near) zero.
    g = F.logsigmoid(rand(*gate_shape) + 2) if gates == "normal" else -20 * torch.rand(*gate_shape, generator=gen,
                                                                                        dtype=torch.float64)
    inputs = dict(q=rand(B, T, H, K), k=rand(B, T, H, K) / K ** 0.5, v=rand(B, T, H, V), g=g)
    if op == "gated_delta_rule":
        inputs["k"] = F.normalize(inputs["k"], dim=-1)
        inputs["beta"] = 2 * torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    return inputs


def summary_and_naive(op: str):
    if op == "gated_delta_rule":
        return gated_delta_rule_state_summary, naive_gated_delta_rule
    return gla_state_summary, naive_recurrent_gla


def apply_transition(transition: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    if transition.dim() == state.dim():
        return transition @ state
    diagonal = transition if transition.dim() == state.dim() - 1 else transition.unsqueeze(-1)
    return diagonal.unsqueeze(-1) * state


def final_states(op: str, inputs: dict, initial_state: torch.Tensor, upstream: tuple, dtype: torch.dtype,
                 cu_seqlens, use_summary: bool) -> dict:
    """Final states from zero and from initial_state, and the gradients of every input through both."""
    summary, naive = summary_and_naive(op)
    leaves = {name: x.detach().to(dtype).clone().requires_grad_() for name, x in inputs.items()}
    initial = initial_state.detach().to(dtype).clone().requires_grad_()
    gates = {name: x for name, x in leaves.items() if name not in ("q", "k", "v")}
    if use_summary:
        from_zero, transition = summary(leaves["k"], leaves["v"], **gates, cu_seqlens=cu_seqlens)
        from_initial = apply_transition(transition, initial) + from_zero
    else:
        run = lambda state: naive(leaves["q"], leaves["k"], leaves["v"], **gates, initial_state=state,
                                  output_final_state=True, cu_seqlens=cu_seqlens)[1]
        from_zero, from_initial = run(torch.zeros_like(initial)), run(initial)
    loss = (from_zero.double() * upstream[0]).sum() + (from_initial.double() * upstream[1]).sum()
    loss.backward()
    grads = {f"d{name}": x.grad for name, x in leaves.items() if name != "q"}
    results = dict(from_zero=from_zero, from_initial=from_initial, dinitial_state=initial.grad, **grads)
    return {name: t.detach().double().clone() for name, t in results.items()}


def check(op: str, B: int, T: int, cu_seqlens, dtype: torch.dtype, tol: float, gates: str = "normal",
          inputs: dict | None = None) -> None:
    inputs = make_inputs(op, B, T, gates) if inputs is None else inputs
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    gen = torch.Generator().manual_seed(1)
    initial_state, *upstream = (torch.randn(N, H, K, V, generator=gen, dtype=torch.float64) for _ in range(3))
    expected = final_states(op, inputs, initial_state, upstream, torch.float64, cu_seqlens, use_summary=False)
    actual = final_states(op, inputs, initial_state, upstream, dtype, cu_seqlens, use_summary=True)
    assert actual["from_zero"].shape == (N, H, K, V)
    assert_matches(actual, expected, tol)


@pytest.mark.parametrize("op", ["gla", "mamba2", "gated_delta_rule"])
@pytest.mark.parametrize("B, T, cu_seqlens", [(2, 131, None), (1, 213, CU_SEQLENS)])
def test_summary_matches_naive_fp64(op, B, T, cu_seqlens, nan_buffers):
    check(op, B, T, cu_seqlens, torch.float64, 1e-10)


@pytest.mark.parametrize("op", ["gla", "mamba2", "gated_delta_rule"])
def test_summary_fp32_strong_gates(op):
    """fp32 with decays down to e^-20 per token: every exponent stays <= 0, nothing overflows."""
    check(op, 1, 213, CU_SEQLENS, torch.float32, 2e-4, gates="strong")


@pytest.mark.parametrize("op", ["gla", "mamba2", "gated_delta_rule"])
def test_vanishing_transition_is_zero_not_denormal(op):
    """A transition that decays below e^-60 is exactly zero, never a denormal number (slow on CPUs): gates
    of e^-0.095 per token over 1000 tokens (e^-95, denormal in fp32), or for the delta rule no gate at all
    but the projections (I - k k^T) of beta = 1 shrinking M. The final states still match the naive loop."""
    inputs = make_inputs(op, 1, 1000)
    inputs["g"] = torch.full_like(inputs["g"], 0.0 if op == "gated_delta_rule" else -0.095)
    if op == "gated_delta_rule":
        inputs["beta"] = torch.ones_like(inputs["beta"])
    summary, _ = summary_and_naive(op)
    _, transition = summary(*(inputs[name].float() for name in inputs if name != "q"))
    assert (transition == 0).all()
    check(op, 1, 1000, None, torch.float32, 2e-4, inputs=inputs)


def test_transition_shapes_follow_the_gate():
    vector, scalar, delta = (make_inputs(op, 1, 9) for op in ("gla", "mamba2", "gated_delta_rule"))
    assert gla_state_summary(vector["k"], vector["v"], vector["g"])[1].shape == (1, H, K)
    assert gla_state_summary(scalar["k"], scalar["v"], scalar["g"])[1].shape == (1, H)
    assert gated_delta_rule_state_summary(delta["k"], delta["v"], delta["g"], delta["beta"])[1].shape == (1, H, K, K)


def test_bad_gate_is_a_clear_error():
    inputs = make_inputs("gla", 1, 9)
    with pytest.raises(ValueError, match="g must be"):
        gla_state_summary(inputs["k"], inputs["v"], inputs["g"][..., :3])
    delta = make_inputs("gated_delta_rule", 1, 9)
    with pytest.raises(ValueError, match="beta must be"):
        gated_delta_rule_state_summary(delta["k"], delta["v"], delta["g"], delta["beta"][:, :4])
