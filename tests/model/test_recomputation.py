"""Training's recomputation around the scan (model/recurrent.py mix) gives plain autograd's outputs and
gradients: for every recurrent mixer, on the CPU path and on the Triton ops (interpreted on CPU), with packed
documents of odd lengths. Plain autograd is the same mixer with its core's chunk_vjp unset, which makes mix
run its three steps without the recomputing Function."""
import dataclasses
import os

import pytest
import torch

from model.config import Mamba2Config

if not torch.cuda.is_available():  # before the first Triton kernel is decorated (see tests/kernels/conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")
CU_SEQLENS = [0, 7, 20, 21, 40]  # two rows of 20: a row start inside the packing, a one-token document


def outputs_and_grads(mixer, x, cu_seqlens):
    out = mixer(x, cu_seqlens)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    params = [p for p in mixer.parameters() if p.requires_grad]
    return [out.detach(), *torch.autograd.grad(out, [x, *params], grad_out)]


SIGNED_MAMBA2 = Mamba2Config(expand=2, head_dim=16, d_state=16, n_groups=2, allow_neg_eigval=True)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("letter, overrides", [("G", {}), ("M", {}), ("M", {"mamba2": SIGNED_MAMBA2}), ("D", {}),
                                               ("X", {}), ("R", {})],
                         ids=["G", "M", "M-negative-eigenvalues", "D", "X", "R"])
def test_recomputed_mixer_matches_plain_autograd(make_lm, letter, overrides, kernels, monkeypatch):
    monkeypatch.setenv("BATON_KERNELS", kernels)
    mixer = make_lm(letter, **overrides).blocks[0].mixer.train()
    x = torch.randn(2, 20, mixer.o_proj.out_features, generator=torch.Generator().manual_seed(0),
                    requires_grad=True)
    cu_seqlens = torch.tensor(CU_SEQLENS, dtype=torch.int32)
    recomputed = outputs_and_grads(mixer, x, cu_seqlens)
    monkeypatch.setattr(mixer, "core", dataclasses.replace(mixer.core, chunk_vjp=None))
    plain = outputs_and_grads(mixer, x, cu_seqlens)
    names = ["output", "x"] + [n for n, p in mixer.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, recomputed, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_recomputation_keeps_only_projections_and_the_scan_output(make_lm):
    """The Function's saved tensors: a Gated DeltaNet mixer keeps its q, k, v, a, b projections, its input
    (for the output gate) and the scan's output, per token; without it, several times more."""
    from model.memory import saved_bytes

    mixer = make_lm("D").blocks[0].mixer.train()
    x = torch.randn(1, 64, mixer.o_proj.out_features, requires_grad=True)
    per_token = (2 * mixer.key_dim + mixer.value_dim + 2 * mixer.num_heads  # q, k, v, a, b
                 + x.shape[-1] + mixer.value_dim) * 4  # x, o: fp32 here
    assert saved_bytes(mixer, x) == 64 * per_token


def test_rglru_recomputation_keeps_its_branch_input_and_scan_output(make_lm):
    """The RG-LRU runs through the same Function: it keeps the branch's projection, its input (for the GeLU
    gate) and the scan's output; not the gate, the conv's output or the gates' logits."""
    from model.memory import saved_bytes

    mixer = make_lm("R").blocks[0].mixer.train()
    x = torch.randn(1, 64, mixer.o_proj.out_features, requires_grad=True)
    per_token = (mixer.width + x.shape[-1] + mixer.width) * 4  # branch, x, h: fp32 here
    assert saved_bytes(mixer, x) == 64 * per_token


def core_inputs(letter: str, generator: torch.Generator, tokens: int):
    """A registered mixer's core and its op's inputs (q, k, v, gates) [1, tokens, H, *], fp32."""
    import torch.nn.functional as F

    from model.gated_deltanet import DELTA_RULE_CORE
    from model.mamba2 import SIGNED_MAMBA2_CORE
    from model.registry import by_letter

    H, K, V = 2, 16, 8
    randn = lambda *shape: torch.randn(1, tokens, H, *shape, generator=generator)  # noqa: E731
    q, k, v = randn(K), randn(K), randn(V)
    if letter == "G":
        return by_letter()["G"].core, (q, k, v), {"g": F.logsigmoid(randn(K)) / 16}
    if letter == "M":
        return by_letter()["M"].core, (q, k, v), {"g": F.logsigmoid(randn())}
    if letter == "M-negative-eigenvalues":  # the sign is a constant of the step (its gradient 0 by contract)
        return SIGNED_MAMBA2_CORE, (q, k, v), {"g": F.logsigmoid(randn()), "sign": torch.where(randn() < 0, -1.0, 1.0)}
    if letter == "D":
        gates = {"g": F.logsigmoid(randn()), "beta": torch.sigmoid(randn())}
        return DELTA_RULE_CORE, (q, F.normalize(k, dim=-1), v), gates
    if letter == "X":
        return by_letter()["X"].core, (q, k, v), {"i": randn(), "f": F.logsigmoid(randn() + 3)}
    scale_in = torch.sigmoid(randn(K))  # R: the q slot holds k, unused
    return by_letter()["R"].core, (scale_in, scale_in, randn(K)), {"a": torch.sigmoid(randn(K))}


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("letter", ["G", "M", "M-negative-eigenvalues", "D", "X", "R"])
def test_chunk_vjp_from_an_initial_state_matches_autograd(letter, kernels, monkeypatch):
    """core.chunk_vjp with an initial state (sequence parallelism's incoming state) gives autograd's gradients
    through core.chunk, d initial_state included: two packed sequences, their states from the op itself."""
    monkeypatch.setenv("BATON_KERNELS", kernels)
    generator = torch.Generator().manual_seed(0)
    cu_seqlens = torch.tensor([0, 7, 20], dtype=torch.int32)
    core, (q, k, v), gates = core_inputs(letter, generator, 20)
    _, state = core.chunk(q.flip(1), k.flip(1), v.flip(1), **{n: g.flip(1) for n, g in gates.items()}, scale=0.5,
                          output_final_state=True, cu_seqlens=cu_seqlens)  # a state the op reaches
    inputs = dict(q=q, k=k, v=v, **gates, state=state)
    leaves = {name: x.detach().requires_grad_(name != "sign") for name, x in inputs.items()}
    if letter == "R":
        leaves["q"] = leaves["k"]  # one tensor in both slots
    o, _ = core.chunk(leaves["q"], leaves["k"], leaves["v"], **{name: leaves[name] for name in gates}, scale=0.5,
                      initial_state=leaves["state"], cu_seqlens=cu_seqlens)
    do = torch.randn(o.shape, generator=generator)
    names = [name for name in leaves if name != "sign" and not (letter == "R" and name == "q")]
    expected = dict(zip(names, torch.autograd.grad(o, [leaves[name] for name in names], do)))
    dq, dk, dv, dgates, d_state = core.chunk_vjp(q, k, v, *gates.values(), do, scale=0.5, cu_seqlens=cu_seqlens,
                                                 initial_state=state)
    actual = dict(q=dq, k=dk, v=dv, **dict(zip(gates, dgates)), state=d_state)
    if letter == "R":
        assert actual.pop("q") is None  # the core's output ignores q
    for name in names:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")
