"""Causal depthwise conv1d in Triton, forward and backward (the CUDA path).

A program takes tokens x BD channels of the flattened [B*T, D] input (forward: BT tokens; backward:
TOKEN_BLOCK tokens, BT at a time). A token's window reads the W-1 tokens before it inside its document (the
per-token document comes from torch.searchsorted on the device: no host sync, and a grid that does not depend
on the documents). The initial state enters as a small per-document correction of the first W-1 tokens'
pre-activations, [N, W-1, D], computed in torch (documents.initial_state_contribution) and loaded by the
kernels; its gradients come back through head_grad, the pre-activation gradient of those tokens.

The backward recomputes the pre-activation of the W tokens each input feeds (W windows over 2W-1 input rows,
re-read from cache), so nothing but x is kept between the passes. Every output
goes to a fresh buffer and no kernel reads what it writes, so the autotuner may launch a kernel any number of
times: d weight and d bias are partial sums per TOKEN_BLOCK tokens (fixed, so the scratch has the same rows
under every config), reduced in torch.
"""
import torch
import triton
import triton.language as tl

from kernels.conv.documents import DocumentLayout, initial_state_contribution, initial_state_weight_grad
from kernels.tuning import autotune

TOKEN_BLOCK = 256  # tokens per backward program: the partial sums of d weight must not change with the config

FORWARD_CONFIGS = [triton.Config({"BT": 32, "BD": 64}, num_warps=4),
                   triton.Config({"BT": 16, "BD": 128}, num_warps=4),
                   triton.Config({"BT": 64, "BD": 32}, num_warps=4)]
# 4 elements per thread: the backward's recomputed windows take some 30 registers per element (compiled for
# sm_80/90/100 with bench.gpu_compile's compile-only driver: 128-185 registers, no spills in the first config).
BACKWARD_CONFIGS = [triton.Config({"BT": 16, "BD": 64}, num_warps=8),
                    triton.Config({"BT": 8, "BD": 64}, num_warps=4),
                    triton.Config({"BT": 16, "BD": 32}, num_warps=4)]


@triton.jit
def _locate(cu_seqlens, document_of_token, tokens, token_mask):
    """(document, position within it) of each token."""
    document = tl.load(document_of_token + tokens, mask=token_mask, other=0)
    return document, tokens - tl.load(cu_seqlens + document, mask=token_mask, other=0)


@triton.jit
def _input_rows(x, rows, channels, channel_mask, num_tokens, D):
    """[BT, BD] fp32: x at these rows (zero outside the input)."""
    mask = ((rows >= 0) & (rows < num_tokens))[:, None] & channel_mask[None, :]
    return tl.load(x + rows.to(tl.int64)[:, None] * D + channels[None, :], mask=mask, other=0).to(tl.float32)


@triton.jit
def _preactivation(x, weight, bias, head_correction, tokens, position, document, token_mask, channels,
                   channel_mask, num_tokens, D, W: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_INITIAL_STATE: tl.constexpr):
    """[BT, BD] fp32: bias + sum_s weight[:, W-1-s] * x[t-s] over the inputs of t's document, plus the initial
    state's share for a document's first W-1 tokens."""
    acc = _input_rows(x, tokens, channels, channel_mask, num_tokens, D) * tl.load(
        weight + channels * W + (W - 1), mask=channel_mask, other=0).to(tl.float32)[None, :]
    for shift in tl.static_range(1, W):
        w_i = tl.load(weight + channels * W + (W - 1 - shift), mask=channel_mask, other=0).to(tl.float32)
        inputs = _input_rows(x, tokens - shift, channels, channel_mask, num_tokens, D)
        acc += tl.where((position >= shift)[:, None], inputs, 0) * w_i[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + channels, mask=channel_mask, other=0).to(tl.float32)[None, :]
    if HAS_INITIAL_STATE:
        head = token_mask & (position < W - 1)
        offsets = (document * (W - 1) + position)[:, None] * D + channels[None, :]
        acc += tl.load(head_correction + offsets, mask=head[:, None] & channel_mask[None, :], other=0)
    return acc


@autotune(FORWARD_CONFIGS, key=["D", "W"])
@triton.jit(do_not_specialize=["num_tokens"])
def causal_conv_fwd_kernel(x, weight, bias, head_correction, cu_seqlens, document_of_token, y, num_tokens, D,
                           W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr,
                           SILU: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    tokens = tl.program_id(0) * BT + tl.arange(0, BT)
    channels = tl.program_id(1) * BD + tl.arange(0, BD)
    token_mask, channel_mask = tokens < num_tokens, channels < D
    document, position = _locate(cu_seqlens, document_of_token, tokens, token_mask)
    pre = _preactivation(x, weight, bias, head_correction, tokens, position, document, token_mask, channels,
                         channel_mask, num_tokens, D, W, HAS_BIAS, HAS_INITIAL_STATE)
    out = pre * tl.sigmoid(pre) if SILU else pre
    tl.store(y + tokens.to(tl.int64)[:, None] * D + channels[None, :], out.to(y.dtype.element_ty),
             mask=token_mask[:, None] & channel_mask[None, :])


@autotune(BACKWARD_CONFIGS, key=["D", "W"])
@triton.jit(do_not_specialize=["num_tokens"])
def causal_conv_bwd_kernel(x, weight, bias, head_correction, final_state_grad, cu_seqlens, document_of_token, dy,
                           dx, dweight_part, dbias_part, head_grad, num_tokens, D, W: tl.constexpr,
                           WP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr,
                           HAS_FINAL_STATE_GRAD: tl.constexpr, SILU: tl.constexpr, TOKEN_BLOCK: tl.constexpr,
                           BT: tl.constexpr, BD: tl.constexpr):
    """dx[t] = sum_s weight[:, W-1-s] g[t+s] over the tokens t+s of t's document, g = dy * act'(pre)
    recomputed; per TOKEN_BLOCK tokens the partial sums of d weight [W, BD] (WP = W rounded up to a power of
    two) and d bias [BD]; g of each document's first W-1 tokens into head_grad [N, W-1, D]."""
    i_t = tl.program_id(0)
    channels = tl.program_id(1) * BD + tl.arange(0, BD)
    channel_mask = channels < D
    taps = tl.arange(0, WP)
    grad_weight = tl.zeros([WP, BD], dtype=tl.float32)
    grad_bias = tl.zeros([BD], dtype=tl.float32)
    for start in range(i_t * TOKEN_BLOCK, tl.minimum(i_t * TOKEN_BLOCK + TOKEN_BLOCK, num_tokens), BT):
        tokens = start + tl.arange(0, BT)
        token_mask = tokens < num_tokens
        document, position = _locate(cu_seqlens, document_of_token, tokens, token_mask)
        grad_x = tl.zeros([BT, BD], dtype=tl.float32)
        for shift in tl.static_range(W):  # the token `shift` ahead reads this one through weight W-1-shift
            ahead = tokens + shift
            ahead_mask = ahead < num_tokens
            ahead_document, ahead_position = _locate(cu_seqlens, document_of_token, ahead, ahead_mask)
            grad = tl.load(dy + ahead.to(tl.int64)[:, None] * D + channels[None, :],
                           mask=ahead_mask[:, None] & channel_mask[None, :], other=0).to(tl.float32)
            if SILU:
                pre = _preactivation(x, weight, bias, head_correction, ahead, ahead_position, ahead_document,
                                     ahead_mask, channels, channel_mask, num_tokens, D, W, HAS_BIAS,
                                     HAS_INITIAL_STATE)
                sigmoid = tl.sigmoid(pre)
                grad *= sigmoid * (1 + pre * (1 - sigmoid))
            w_i = tl.load(weight + channels * W + (W - 1 - shift), mask=channel_mask, other=0).to(tl.float32)
            grad_x += tl.where((ahead_position >= shift)[:, None], grad, 0) * w_i[None, :]
            if shift == 0:  # these tokens' own gradient: the weight and bias sums, the documents' first tokens
                for i in tl.static_range(W):
                    inputs = _input_rows(x, tokens - (W - 1 - i), channels, channel_mask, num_tokens, D)
                    inputs = tl.where((position >= W - 1 - i)[:, None], inputs, 0)
                    grad_weight += tl.where(taps[:, None] == i, tl.sum(grad * inputs, axis=0)[None, :], 0)
                grad_bias += tl.sum(grad, axis=0)
                own_grad = grad
        if W > 1:
            head = token_mask & (position < W - 1)
            tl.store(head_grad + (document * (W - 1) + position)[:, None] * D + channels[None, :], own_grad,
                     mask=head[:, None] & channel_mask[None, :])
        if HAS_FINAL_STATE_GRAD:  # the document's last W-1 inputs are its final state
            from_end = tl.load(cu_seqlens + document + 1, mask=token_mask, other=0) - 1 - tokens
            mask = (token_mask & (from_end < W - 1))[:, None] & channel_mask[None, :]
            offsets = (document[:, None] * D + channels[None, :]) * (W - 1) + (W - 2 - from_end)[:, None]
            grad_x += tl.load(final_state_grad + offsets, mask=mask, other=0).to(tl.float32)
        tl.store(dx + tokens.to(tl.int64)[:, None] * D + channels[None, :], grad_x.to(dx.dtype.element_ty),
                 mask=token_mask[:, None] & channel_mask[None, :])
    part = (i_t * W).to(tl.int64) * D
    tl.store(dweight_part + part + taps[:, None] * D + channels[None, :], grad_weight,
             mask=(taps < W)[:, None] & channel_mask[None, :])
    if HAS_BIAS:
        tl.store(dbias_part + i_t.to(tl.int64) * D + channels, grad_bias, mask=channel_mask)


def _grid(num_tokens: int, D: int, token_block: int | None = None):
    """Programs over (tokens, channels): token_block tokens each, or the config's BT."""
    return lambda meta: (triton.cdiv(num_tokens, token_block or meta["BT"]), triton.cdiv(D, meta["BD"]))


def _head_correction(initial_state: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor | None:
    if initial_state is None:
        return None
    return initial_state_contribution(initial_state.float(), weight.float()).contiguous()


def conv_forward_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        initial_state: torch.Tensor | None, layout: DocumentLayout, activation: str | None,
                        ) -> torch.Tensor:
    """Same contract as conv_forward_torch."""
    num_tokens, D = x.shape
    y = torch.empty_like(x)
    causal_conv_fwd_kernel[_grid(num_tokens, D)](
        x, weight, bias, _head_correction(initial_state, weight), layout.cu_seqlens, layout.document_of_token(), y,
        num_tokens, D, W=weight.shape[1], HAS_BIAS=bias is not None, HAS_INITIAL_STATE=initial_state is not None,
        SILU=activation == "silu")
    return y


def conv_backward_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         initial_state: torch.Tensor | None, final_state_grad: torch.Tensor | None,
                         layout: DocumentLayout, activation: str | None, grad_y: torch.Tensor,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Same contract as conv_backward_torch."""
    num_tokens, D = x.shape
    W = weight.shape[1]
    blocks = triton.cdiv(num_tokens, TOKEN_BLOCK)
    grad_x = torch.empty_like(x)
    grad_weight_part = torch.empty(blocks, W, D, dtype=torch.float32, device=x.device)
    grad_bias_part = torch.empty(blocks, D, dtype=torch.float32, device=x.device) if bias is not None else None
    # Zeros: slots past the end of a document shorter than W-1 belong to no token.
    head_grad = torch.zeros(layout.cu_seqlens.numel() - 1, W - 1, D, dtype=torch.float32, device=x.device)
    causal_conv_bwd_kernel[_grid(num_tokens, D, TOKEN_BLOCK)](
        x, weight, bias, _head_correction(initial_state, weight), final_state_grad, layout.cu_seqlens,
        layout.document_of_token(), grad_y, grad_x, grad_weight_part, grad_bias_part, head_grad, num_tokens, D,
        W=W, WP=triton.next_power_of_2(W), HAS_BIAS=bias is not None, HAS_INITIAL_STATE=initial_state is not None,
        HAS_FINAL_STATE_GRAD=final_state_grad is not None, SILU=activation == "silu", TOKEN_BLOCK=TOKEN_BLOCK)
    grad_weight = grad_weight_part.sum(0).T
    if initial_state is not None:
        grad_weight = grad_weight + initial_state_weight_grad(head_grad, initial_state.float())
    grad_bias = grad_bias_part.sum(0) if bias is not None else None
    return grad_x, grad_weight, grad_bias, head_grad
