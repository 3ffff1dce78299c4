"""Liger models (model/liger.py) under sequence parallelism, sp = 2 (two gloo processes), equal the model on full
rows: logits and the gradient of every trainable parameter (LoRA's too), in Liger mode and in teacher mode (the
distillation teacher: full attention), with packed documents that cross the rank boundary and a window longer than a
rank's slice (the window's keys come from the previous rank)."""
import pytest
import torch
import torch.distributed as dist

from model import LM
from model.liger import teacher_mode
from model.lora import is_lora_parameter
from parallel.sequence import SequenceParallel
from tests.parallel.test_sequence_model import LOCAL_LEN, VOCAB, batch_layout, cu_seqlens_of

TINY = dict(vocab_size=VOCAB, d_model=32, attention=dict(num_heads=4, num_kv_heads=2), liger=dict(window=8))
VARIANTS = {
    "Z": dict(pattern="Z"),
    "ZAZ-scalar": dict(pattern="ZAZ", liger=dict(window=5, gate="scalar")),
    "ZA-lora": dict(pattern="ZA", lora=dict(rank=4, targets=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])),
}


def run_checks(rank: int, world_size: int) -> None:
    group = dist.new_group(list(range(world_size)))
    for name, settings in VARIANTS.items():
        for teacher in (False, True):
            torch.manual_seed(0)  # the same weights and tokens on every rank
            lm = LM.from_config(TINY | settings)
            with torch.no_grad():
                for param in lm.parameters():
                    param.add_(0.1 * torch.randn_like(param))  # LoRA's B off zero
            tokens, starts = batch_layout(world_size)
            T = tokens.shape[1]
            mode = teacher_mode(lm) if teacher else torch.enable_grad()
            with mode:
                logits = lm(tokens, cu_seqlens=cu_seqlens_of(starts, T))
                weight = torch.randn_like(logits)
                trainable = not (teacher and "lora" in settings)  # a LoRA model's teacher: frozen base, LoRA off
                if trainable:
                    (logits * weight).sum().backward()
                expected = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
                lm.zero_grad()
                lo = rank * LOCAL_LEN
                sp = SequenceParallel(group, cu_seqlens_of(starts, LOCAL_LEN, lo),
                                      torch.tensor([lo in row for row in starts]))
                local = lm(tokens[:, lo:lo + LOCAL_LEN], cu_seqlens=sp.cu_seqlens, sp=sp)
                if trainable:
                    (local * weight[:, lo:lo + LOCAL_LEN]).sum().backward()
            what = f"{name}{' (teacher)' if teacher else ''}"
            torch.testing.assert_close(local, logits[:, lo:lo + LOCAL_LEN].detach(), rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{what}: logits differ: {m}")
            grads = {n: p.grad for n, p in lm.named_parameters() if p.grad is not None}
            assert grads.keys() == expected.keys() and (bool(grads) == trainable), what
            if "lora" in settings:  # the base frozen: only LoRA's A and B have gradients
                assert all(is_lora_parameter(n) for n in grads), what
            for n, grad in grads.items():
                dist.all_reduce(grad, group=group)
                # fp32 rounding of the kernels (chunked over other boundaries), relative to the gradient's size
                error, scale = (grad - expected[n]).abs().amax().item(), expected[n].abs().amax().item()
                assert error <= 1e-5 + 1e-5 * scale, f"{what}: d{n} differs by {error} (largest {scale})"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_liger_under_sequence_parallel_matches_full_rows(spawn):
    spawn(run_checks, 2)
