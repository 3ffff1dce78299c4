"""Training's recomputation around the scan (model/recurrent.py mix) gives plain autograd's outputs and
gradients: for every recurrent mixer, on the CPU path and on the Triton ops (interpreted on CPU), with packed
documents of odd lengths. Plain autograd is the same mixer with its core's chunk_vjp unset, which makes mix
run its three steps without the recomputing Function."""
import dataclasses
import os

import pytest
import torch

import model.gated_deltanet
import model.gla
import model.mamba2

if not torch.cuda.is_available():  # before the first Triton kernel is decorated (see tests/kernels/conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")
CORES = {"G": (model.gla, "GLA_CORE"), "M": (model.mamba2, "MAMBA2_CORE"),
         "D": (model.gated_deltanet, "DELTA_RULE_CORE")}
CU_SEQLENS = [0, 7, 20, 21, 40]  # two rows of 20: a row start inside the packing, a one-token document


def outputs_and_grads(mixer, x, cu_seqlens):
    out = mixer(x, cu_seqlens)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    params = [p for p in mixer.parameters() if p.requires_grad]
    return [out.detach(), *torch.autograd.grad(out, [x, *params], grad_out)]


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("letter", ["G", "M", "D"])
def test_recomputed_mixer_matches_plain_autograd(make_lm, letter, kernels, monkeypatch):
    monkeypatch.setenv("BATON_KERNELS", kernels)
    mixer = make_lm(letter).blocks[0].mixer.train()
    x = torch.randn(2, 20, mixer.o_proj.out_features, generator=torch.Generator().manual_seed(0),
                    requires_grad=True)
    cu_seqlens = torch.tensor(CU_SEQLENS, dtype=torch.int32)
    recomputed = outputs_and_grads(mixer, x, cu_seqlens)
    module, name = CORES[letter]
    monkeypatch.setattr(module, name, dataclasses.replace(getattr(module, name), chunk_vjp=None))
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
