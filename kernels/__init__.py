"""Recurrent core ops behind one entry point each (see DESIGN.md, "the recurrent state").

Every op takes and returns the recurrent state, so packed documents (cu_seqlens), decoding (T=1 with a
cached state) and sequence parallelism (an initial state from earlier ranks) all use the same call.
CUDA tensors take the Triton kernels, CPU tensors the chunked PyTorch path (see kernels/backend.py).
"""
from kernels.conv import causal_conv1d
from kernels.gated_delta_rule import (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule,
                                      gated_delta_rule_state_summary)
from kernels.gated_delta_product import (chunk_gated_delta_product, fused_recurrent_gated_delta_product,
                                         gated_delta_product_state_summary)
from kernels.gla import chunk_gla, fused_recurrent_gla, gla_state_summary

__all__ = [
    "causal_conv1d",
    "chunk_gated_delta_product",
    "chunk_gated_delta_rule",
    "chunk_gla",
    "fused_recurrent_gated_delta_product",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gla",
    "gated_delta_product_state_summary",
    "gated_delta_rule_state_summary",
    "gla_state_summary",
]
