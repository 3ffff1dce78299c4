"""Regional torch.compile (train.compile=true) gives eager mode's loss and gradients, on the CPU path (the
recurrent ops traced as PyTorch) and on the GPU path (the Triton ops as opaque custom ops, interpreted here)."""
import os

import pytest
import torch

from model import LM, ModelConfig
from model.config import AttentionConfig, GatedDeltaNetConfig, Mamba2Config, RGLRUConfig
from parallel.compile import apply_compile

if not torch.cuda.is_available():  # before the first Triton kernel is decorated (see tests/kernels/conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")
VOCAB = 61


def loss_and_grads(lm: LM, ids: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    lm.zero_grad()
    loss = lm(ids, cu_seqlens=cu_seqlens, labels=ids.roll(-1, 1))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in lm.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_compiled_blocks_match_eager(kernels, monkeypatch):
    monkeypatch.setenv("BATON_KERNELS", kernels)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, d_ff=64, pattern="DMRA", tie_embeddings=False,
                      attention=AttentionConfig(num_heads=2), mamba2=Mamba2Config(expand=2, head_dim=16, d_state=16),
                      gated_deltanet=GatedDeltaNetConfig(num_heads=2, head_dim=16),
                      rglru=RGLRUConfig(num_heads=2, width=32))
    lm = LM(cfg)
    ids = torch.randint(0, VOCAB, (1, 80))
    cu_seqlens = torch.tensor([0, 13, 80], dtype=torch.int32)
    eager_loss, eager_grads = loss_and_grads(lm, ids, cu_seqlens)
    apply_compile(lm)
    compiled_loss, compiled_grads = loss_and_grads(lm, ids, cu_seqlens)
    assert all(block._compiled_call_impl is not None for block in lm.blocks)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-4)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-4, msg=name)
