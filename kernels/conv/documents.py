"""Where every token sits in its document, and the per-document state pieces both backends share.

Rows of a batch and the documents of cu_seqlens are one case: without cu_seqlens the rows are documents of
length T. Everything is computed on the device (searchsorted, gathers): no host sync, so the CPU can queue
the next layers while the GPU works. The state of a document is its last W-1 inputs; the initial state
stands in for the W-1 inputs before its first token.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DocumentLayout:
    cu_seqlens: torch.Tensor  # [N+1] long: document offsets in the flattened [B*T] token axis
    num_tokens: int

    @property
    def starts(self) -> torch.Tensor:
        return self.cu_seqlens[:-1]

    @property
    def ends(self) -> torch.Tensor:
        return self.cu_seqlens[1:]

    @property
    def lengths(self) -> torch.Tensor:
        return self.ends - self.starts

    def document_of_token(self) -> torch.Tensor:
        """[B*T] long: the document of each token. right=True: the last offset <= t, i.e. the non-empty
        document holding t when empty ones share its start."""
        tokens = torch.arange(self.num_tokens, device=self.cu_seqlens.device)
        return torch.searchsorted(self.cu_seqlens, tokens, right=True) - 1

    def _rows(self, first: torch.Tensor, count: int) -> torch.Tensor:
        return first.unsqueeze(1) + torch.arange(count, device=self.cu_seqlens.device)

    def head_rows(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of each document's first `count` tokens, [N, count], clamped into range, and which of
        them belong to the document (a document may be shorter)."""
        rows = self._rows(self.starts, count)
        return rows.clamp(max=self.num_tokens - 1), rows < self.ends.unsqueeze(1)

    def tail_rows(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of each document's last `count` tokens, oldest first, [N, count], clamped into range, and
        which of them belong to the document."""
        rows = self._rows(self.ends - count, count)
        return rows.clamp(min=0), rows >= self.starts.unsqueeze(1)

    def preceding_rows(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the `count` tokens before each document's start (whatever document they are in), [N, count],
        clamped into range, and which of them exist."""
        rows = self._rows(self.starts - count, count)
        return rows.clamp(min=0), rows >= 0


def document_layout(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int,
                    device: torch.device) -> DocumentLayout:
    if cu_seqlens is None:
        cu_seqlens = torch.arange(batch + 1, device=device) * seq_len
    return DocumentLayout(cu_seqlens.to(device=device, dtype=torch.long), batch * seq_len)


def final_state(x: torch.Tensor, initial_state: torch.Tensor | None, layout: DocumentLayout,
                width: int) -> torch.Tensor:
    """[N, D, W-1]: each document's last W-1 inputs; a document shorter than W-1 keeps the newest slots
    of its initial state (or zeros) in front. x is [B*T, D]."""
    rows, from_input = layout.tail_rows(width - 1)
    inputs = x[rows].transpose(1, 2)  # [N, D, W-1]
    if initial_state is None:
        return torch.where(from_input.unsqueeze(1), inputs, 0).to(x.dtype)
    slot = layout.lengths.unsqueeze(1) + torch.arange(width - 1, device=x.device)  # in the initial state
    carried = initial_state.gather(2, slot.clamp(max=width - 2).unsqueeze(1).expand_as(inputs))
    return torch.where(from_input.unsqueeze(1), inputs, carried.to(x.dtype))


def state_windows(state: torch.Tensor, width: int) -> torch.Tensor:
    """[N, D, W-1, W]: window p of a state [N, D, W-1] followed by zeros is state[..., p:p+W]."""
    return F.pad(state, (0, width - 1)).unfold(2, width, 1)


def initial_state_contribution(initial_state: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[N, W-1, D]: what the initial state adds to the pre-activation of each document's first W-1 tokens:
    token p sees state slots p..W-2 through weights 0..W-2-p."""
    windows = state_windows(initial_state, weight.shape[1])
    return torch.einsum("ndpi,di->npd", windows, weight)


def initial_state_weight_grad(head_grad: torch.Tensor, initial_state: torch.Tensor) -> torch.Tensor:
    """d weight [D, W] of initial_state_contribution, from the pre-activation gradient of each document's first
    W-1 tokens, head_grad [N, W-1, D]."""
    return torch.einsum("npd,ndpi->di", head_grad, state_windows(initial_state, initial_state.shape[2] + 1))


def initial_state_grad(head_grad: torch.Tensor, weight: torch.Tensor, final_state_grad: torch.Tensor | None,
                       layout: DocumentLayout) -> torch.Tensor:
    """d initial_state [N, D, W-1] from the pre-activation gradient of each document's first W-1 tokens,
    head_grad [N, W-1, D] (zero past a document's end), and the final state's gradient: slot j feeds token p
    through weight j-p, and is the final state's slot j-L when the document (length L) is shorter than W-1.
    Without final_state_grad: the transpose of initial_state_contribution."""
    width = weight.shape[1]
    # Slot j gathers tokens p = j-W+1+k, k = 0..W-1 (the left padding stands for p < 0), through weight W-1-k.
    padded = F.pad(head_grad.transpose(1, 2), (width - 1, 0))
    grad = torch.einsum("ndjk,dk->ndj", padded.unfold(2, width, 1), weight.flip(1))
    if final_state_grad is not None:
        source = torch.arange(width - 1, device=grad.device) - layout.lengths.unsqueeze(1)  # [N, W-1]
        carried = final_state_grad.gather(2, source.clamp(min=0).unsqueeze(1).expand_as(grad))
        grad = grad + torch.where((source >= 0).unsqueeze(1), carried.to(grad.dtype), 0)
    return grad
