"""Shared by the kernel tests: run an op path with gradients, and compare it with the reference."""
import torch

STATE_AND_INPUTS = ("q", "k", "v", "initial_state")


def run(fn, inputs, upstream, dtype, device, cu_seqlens=None):
    """Output, final state and the gradients of every input (as fp64 on the CPU). The inputs besides
    q, k, v and initial_state are the op's gates (g, and beta for the delta rule), passed by name."""
    leaves = {name: x.detach().to(device, dtype).requires_grad_() for name, x in inputs.items()}
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device)
    gates = {name: x for name, x in leaves.items() if name not in STATE_AND_INPUTS}
    o, final = fn(leaves["q"], leaves["k"], leaves["v"], **gates, initial_state=leaves["initial_state"],
                  output_final_state=True, cu_seqlens=cu_seqlens)
    loss = (o.double() * upstream["o"].to(device)).sum() + (final.double() * upstream["final_state"].to(device)).sum()
    loss.backward()
    results = {"o": o, "final_state": final, **{f"d{name}": x.grad for name, x in leaves.items()}}
    return {name: t.detach().double().cpu() for name, t in results.items()}


def assert_matches(actual, expected, tol):
    """Max error relative to the largest expected magnitude, per output and gradient."""
    for name, e in expected.items():
        a = actual[name]
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        error = ((a - e).abs().max() / e.abs().max().clamp_min(1e-12)).item()
        assert error <= tol, f"{name}: relative error {error:.2e} > {tol:.0e}"
