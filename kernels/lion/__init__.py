"""LION (Afzal et al. 2025, arXiv:2502.16249): bidirectional linear attention in three equal forms.

- full attention (`lion_attention`, full.py): Scale(Q K^T (.) M) V with the symmetric mask M (its convention is
  pinned there), for short sequences;
- chunkwise (`chunk_lion`, chunk.py): GLA's chunked op run forward and on the reversed sequences, combined with
  the diagonal counted once: linear time and memory, Triton on CUDA, chunked PyTorch elsewhere (training);
- RNN (`recurrent_lion`, chunk.py): the same with GLA's fused recurrent op, a constant state per direction
  (inference on long inputs).
`naive_recurrent_lion` (naive.py) is the reference: the two recurrences a token at a time. normalize=True is LION
(rows divided by their sums, through a [v | 1] value column); normalize=False is the bidirectional form of GLA
and Mamba2 (no normaliser). Gates: a vector gate [B, T, H, K] (GLA), a scalar one [B, T, H] (LION-D, LION-S,
Mamba2), or None (LION-LIT). Backward by autograd through the GLA ops, so every path is differentiable.
"""
from kernels.lion.chunk import chunk_lion, combine_directions, recurrent_lion, with_normalizer, zero_gate
from kernels.lion.full import lion_attention
from kernels.lion.naive import naive_recurrent_lion
from kernels.lion.sequences import backward_gates, reverse_sequences

FORMS = ("full", "chunk", "rnn")


def lion(q, k, v, g=None, scale=None, cu_seqlens=None, normalize=True, eps=1e-6, form="chunk"):
    """One entry point for the three forms (form: full | chunk | rnn), same contract and result."""
    if form not in FORMS:
        raise ValueError(f"LION form '{form}' is not one of {', '.join(FORMS)}")
    op = {"full": lion_attention, "chunk": chunk_lion, "rnn": recurrent_lion}[form]
    return op(q, k, v, g, scale=scale, cu_seqlens=cu_seqlens, normalize=normalize, eps=eps)


__all__ = ["FORMS", "backward_gates", "chunk_lion", "combine_directions", "lion", "lion_attention",
           "naive_recurrent_lion", "recurrent_lion", "reverse_sequences", "with_normalizer", "zero_gate"]
