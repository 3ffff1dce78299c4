"""Fused, chunked linear cross-entropy: the head's matmul and the loss over chunks of tokens.

`logits = hidden @ weight.T` followed by cross entropy would hold the whole [tokens, vocab] logits (and, in
fp32 for the softmax, a second copy, then its gradient): 16 x vocab bytes per token at the backward's peak.
Here one chunk of tokens at a time goes through the matmul (in the autocast dtype), logsumexp in fp32, and,
when a gradient is wanted, the gradient of the chunk's loss with respect to its hidden states and to the
weight, all inside the forward (as Liger's fused linear cross entropy does). The backward only scales those
gradients by the incoming one. What is kept between forward and backward is d hidden [tokens, d_model] and
d weight [vocab, d_model] (fp32): nothing of size tokens x vocab, and no second head matmul in the backward.

The loss is F.cross_entropy's: targets equal to ignore_index are skipped (loss 0 with reduction='none'),
'mean' divides by the number of scored targets. Columns from valid_vocab_size on (padding of a rounded-up
vocabulary) are -inf: never scored, never learnt. reduction='none' (per-token losses) has no gradient: it
serves evaluation, where the gradient of each token's loss is never needed.
"""
from typing import Optional

import torch

REDUCTIONS = ("mean", "sum", "none")
CHUNK_LOGITS = 1 << 23  # logits per chunk (tokens x vocab): 32 MiB in fp32; 256 tokens at a 32K vocabulary


def chunk_tokens(vocab_size: int) -> int:
    return max(1, CHUNK_LOGITS // vocab_size)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean",
                         valid_vocab_size: Optional[int] = None) -> torch.Tensor:
    """Cross entropy of `hidden @ weight.T` (hidden [..., d], weight [vocab, d]) against targets [...] without
    materialising the logits. Under autocast the matmuls run in the autocast dtype, the softmax in fp32;
    returns fp32: a scalar, or the per-token losses shaped like targets (reduction='none')."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction '{reduction}' is not one of {', '.join(REDUCTIONS)}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} "
                         "do not match")
    device_type = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else hidden.dtype)
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if wants_grad and reduction == "none":
        raise ValueError("linear_cross_entropy: reduction='none' gives no gradient (per-token losses are for "
                         "evaluation); use 'mean' or 'sum' to train")
    # The cast is tracked by autograd, so d hidden reaches the caller in the caller's dtype.
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).to(compute_dtype)
    with torch.autocast(device_type, enabled=False):
        losses = _LinearCrossEntropy.apply(flat_hidden, weight, targets.reshape(-1), ignore_index, reduction,
                                           valid_vocab_size, wants_grad)
    return losses.view(targets.shape) if reduction == "none" else losses


class _LinearCrossEntropy(torch.autograd.Function):
    """hidden [N, d] in the compute dtype, weight [vocab, d] in any dtype, targets [N]."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, reduction: str, valid_vocab_size: Optional[int],
                wants_grad: bool):
        ctx.weight_dtype = weight.dtype
        compute_weight = weight.to(hidden.dtype)
        scored = targets != ignore_index
        # mean: each scored token's loss weighs 1 / (scored tokens), as in F.cross_entropy (0 of them: nan).
        token_weight = 1.0 / scored.sum() if reduction == "mean" else torch.ones((), device=hidden.device)
        losses = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if wants_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants_grad else None
        step = chunk_tokens(weight.shape[0])
        for start in range(0, hidden.shape[0], step):
            rows = slice(start, start + step)
            h, target, keep = hidden[rows], targets[rows].clamp(min=0), scored[rows]
            logits = (h @ compute_weight.T).float()
            if valid_vocab_size is not None:
                logits[:, valid_vocab_size:] = float("-inf")
            logsumexp = logits.logsumexp(-1)
            losses[rows] = (logsumexp - logits.gather(1, target[:, None])[:, 0]) * keep
            if wants_grad:
                # d loss / d logits = softmax - one_hot(target), per scored token, times its weight.
                grad_logits = logits.sub_(logsumexp[:, None]).exp_()
                grad_logits[torch.arange(len(target), device=target.device), target] -= 1
                grad_logits.mul_((keep * token_weight)[:, None])
                grad_logits = grad_logits.to(hidden.dtype)
                grad_hidden[rows] = grad_logits @ compute_weight
                grad_weight += grad_logits.T @ h
        if wants_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        if reduction == "none":
            return losses
        total = losses.sum()
        return total * token_weight if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        # grad_loss is a scalar: the chunks' gradients were computed for a unit one.
        return (grad_hidden * grad_loss.to(grad_hidden.dtype), (grad_weight * grad_loss).to(ctx.weight_dtype),
                None, None, None, None, None)


def linear_distillation_loss(hidden: torch.Tensor, teacher_hidden: torch.Tensor, weight: torch.Tensor,
                             targets: torch.Tensor, distill: float, ignore_index: int = -100,
                             valid_vocab_size: Optional[int] = None) -> torch.Tensor:
    """The mean over scored tokens of cross entropy + distill x KL(teacher || model), where the model's logits are
    hidden @ weight.T and the teacher's teacher_hidden @ weight.T (the same head: a linearized model's teacher is
    its own frozen base, model/liger.py), chunk by chunk as linear_cross_entropy does: no [tokens, vocab] tensor
    is kept. The teacher is a constant target (no gradient reaches teacher_hidden)."""
    if hidden.shape[:-1] != targets.shape or teacher_hidden.shape != hidden.shape:
        raise ValueError(f"linear_distillation_loss: hidden {tuple(hidden.shape)}, teacher "
                         f"{tuple(teacher_hidden.shape)} and targets {tuple(targets.shape)} do not match")
    device_type = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else hidden.dtype)
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    flat = lambda x: x.reshape(-1, x.shape[-1]).to(compute_dtype)
    with torch.autocast(device_type, enabled=False):
        return _LinearDistillation.apply(flat(hidden), flat(teacher_hidden).detach(), weight, targets.reshape(-1),
                                         float(distill), ignore_index, valid_vocab_size, wants_grad)


class _LinearDistillation(torch.autograd.Function):
    """hidden, teacher [N, d] in the compute dtype, weight [vocab, d], targets [N]; the mean loss (fp32 scalar).
    d loss / d logits per scored token = (1 + distill) softmax(s) - one_hot(target) - distill softmax(t)."""

    @staticmethod
    def forward(ctx, hidden, teacher, weight, targets, distill: float, ignore_index: int,
                valid_vocab_size: Optional[int], wants_grad: bool):
        ctx.weight_dtype = weight.dtype
        vocab = weight.shape[0] if valid_vocab_size is None else valid_vocab_size  # padding columns never count
        compute_weight = weight[:vocab].to(hidden.dtype)
        scored = targets != ignore_index
        token_weight = 1.0 / scored.sum()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if wants_grad else None
        weight_grad = wants_grad and ctx.needs_input_grad[2]  # a LoRA model's head is frozen: no [vocab, d] matmul
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight_grad else None
        step = chunk_tokens(vocab)
        for start in range(0, hidden.shape[0], step):
            rows = slice(start, start + step)
            h, target, keep = hidden[rows], targets[rows].clamp(min=0), scored[rows]
            log_p = (h @ compute_weight.T).float().log_softmax(-1)
            log_t = (teacher[rows] @ compute_weight.T).float().log_softmax(-1)
            p_t = log_t.exp()
            cross_entropy = -log_p.gather(1, target[:, None])[:, 0]
            kl = (p_t * (log_t - log_p)).sum(-1)
            total += ((cross_entropy + distill * kl) * keep).sum()
            if wants_grad:
                grad_logits = log_p.exp_().mul_(1 + distill).sub_(p_t.mul_(distill))
                grad_logits[torch.arange(len(target), device=target.device), target] -= 1
                grad_logits.mul_((keep * token_weight)[:, None])
                grad_logits = grad_logits.to(hidden.dtype)
                grad_hidden[rows] = grad_logits @ compute_weight
                if weight_grad:
                    grad_weight[:vocab] += grad_logits.T @ h
        if wants_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        return total * token_weight

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, grad_weight, None, None, None, None, None
