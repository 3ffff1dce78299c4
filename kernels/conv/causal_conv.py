"""Causal depthwise conv1d in PyTorch (every device: W <= 4 shifted multiply-adds, memory bound).

Each sequence is laid out behind its W-1 state slots (the initial state, or zeros), so a window never
reaches into the previous document and the final state is simply the sequence's last W-1 slots.
"""
import torch
import torch.nn.functional as F

from kernels.common import sequence_bounds


def causal_conv1d_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        activation: str | None = None, initial_state: torch.Tensor | None = None,
                        output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, T, D = x.shape
    W = weight.shape[1]
    bounds = torch.tensor(sequence_bounds(cu_seqlens, B, T), device=x.device)
    N = bounds.numel() - 1
    lengths = bounds[1:] - bounds[:-1]
    seq_start = bounds[:-1] + torch.arange(N, device=x.device) * (W - 1)  # first state slot of each sequence
    seq_of_token = torch.repeat_interleave(torch.arange(N, device=x.device), lengths)
    token_slot = torch.arange(B * T, device=x.device) + (seq_of_token + 1) * (W - 1)
    state_slot = (seq_start.unsqueeze(1) + torch.arange(W - 1, device=x.device)).flatten()

    dtype = torch.promote_types(x.dtype, torch.float32)
    padded = x.new_zeros(B * T + N * (W - 1), D, dtype=dtype).index_copy(0, token_slot, x.reshape(B * T, D).to(dtype))
    if initial_state is not None:
        padded = padded.index_copy(0, state_slot, initial_state.transpose(1, 2).reshape(N * (W - 1), D).to(dtype))
    weight = weight.to(dtype)
    y = sum(weight[:, i] * padded[token_slot - (W - 1 - i)] for i in range(W))
    if bias is not None:
        y = y + bias.to(dtype)
    if activation == "silu":
        y = F.silu(y)
    y = y.view(B, T, D).to(x.dtype)
    if not output_final_state:
        return y, None
    last_slots = (seq_start + lengths).unsqueeze(1) + torch.arange(W - 1, device=x.device)  # [N, W-1]
    return y, padded[last_slots].transpose(1, 2).to(x.dtype)
