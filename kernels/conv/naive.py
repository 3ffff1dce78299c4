"""Causal depthwise conv1d as a loop over time with a window of the last W inputs: the ground truth."""
import torch


def naive_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        activation: str | None = None, initial_state: torch.Tensor | None = None,
                        output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y_t = act(bias + sum_i weight[:, i] * x_{t-W+1+i}); x [B,T,D], weight [D,W], state [N,D,W-1]."""
    B, T, D = x.shape
    W = weight.shape[1]
    bounds = list(range(0, B * T + 1, T)) if cu_seqlens is None else cu_seqlens.tolist()
    flat = x.reshape(B * T, D)
    outputs, finals = [], []
    for n, (bos, eos) in enumerate(zip(bounds, bounds[1:])):
        window = (initial_state[n].T if initial_state is not None else x.new_zeros(W - 1, D))
        for t in range(bos, eos):
            window = torch.cat([window, flat[t:t + 1]])  # the last W inputs, oldest first
            y = (window * weight.T).sum(0) + (0 if bias is None else bias)
            outputs.append(torch.nn.functional.silu(y) if activation == "silu" else y)
            window = window[1:]
        finals.append(window.T)
    y = torch.stack(outputs).view(B, T, D) if outputs else x.new_zeros(x.shape)
    return y, (torch.stack(finals) if output_final_state else None)
