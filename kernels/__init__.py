"""Recurrent core ops behind one entry point each (see ARCHITECTURE.md, "The recurrent state").

Every op takes and returns the recurrent state, so packed documents (cu_seqlens), decoding (T=1 with a
cached state) and sequence parallelism (an initial state from earlier ranks) all use the same call.
CUDA tensors take the Triton kernels, CPU tensors the chunked PyTorch path (see kernels/backend.py).
"""
from kernels.block_diagonal_scan import (block_diagonal_scan_state_summary, chunk_block_diagonal_scan,
                                         combine_block_diagonal_states, fused_recurrent_block_diagonal_scan)
from kernels.conv import causal_conv1d
from kernels.diagonal_scan import (chunk_diagonal_scan, diagonal_scan_state_summary,
                                   fused_recurrent_diagonal_scan)
from kernels.gated_delta_product import (chunk_gated_delta_product, fused_recurrent_gated_delta_product,
                                         gated_delta_product_state_summary)
from kernels.gated_delta_rule import (chunk_gated_delta_rule, chunk_gated_delta_rule_vjp,
                                      fused_recurrent_gated_delta_rule, gated_delta_rule_state_summary)
from kernels.gla import chunk_gla, chunk_gla_vjp, fused_recurrent_gla, gla_state_summary
from kernels.gla.signed import (chunk_gla_signed, chunk_gla_signed_vjp, fused_recurrent_gla_signed,
                                gla_signed_state_summary)
from kernels.mlstm import (chunk_mlstm, chunk_mlstm_vjp, combine_mlstm_states, fused_recurrent_mlstm,
                           mlstm_state_summary)
from kernels.norm import rms_norm
from kernels.rotary import rotate_rows

__all__ = [
    "block_diagonal_scan_state_summary",
    "causal_conv1d",
    "chunk_block_diagonal_scan",
    "chunk_gated_delta_product",
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_vjp",
    "chunk_gla",
    "chunk_diagonal_scan",
    "chunk_gla_signed",
    "chunk_gla_signed_vjp",
    "chunk_gla_vjp",
    "chunk_mlstm",
    "chunk_mlstm_vjp",
    "combine_block_diagonal_states",
    "combine_mlstm_states",
    "diagonal_scan_state_summary",
    "fused_recurrent_block_diagonal_scan",
    "fused_recurrent_diagonal_scan",
    "fused_recurrent_gated_delta_product",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gla",
    "fused_recurrent_gla_signed",
    "fused_recurrent_mlstm",
    "gated_delta_product_state_summary",
    "gated_delta_rule_state_summary",
    "gla_signed_state_summary",
    "gla_state_summary",
    "mlstm_state_summary",
    "rms_norm",
    "rotate_rows",
]
