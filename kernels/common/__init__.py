"""What every recurrent op shares (see ARCHITECTURE.md, "Kernels").

- contract.py: the state contract's input checks, and the PyTorch paths' numerics helpers;
- chunks.py: CHUNK_SIZE, the sequence bounds, the chunked layout of the PyTorch paths and the chunk index of
  the Triton kernels (int64, varlen and fixed-length alike);
- tiles.py: the Triton jit helpers (chunk rows, block and state loads, decays, dots with the precision rule,
  the inverse of a unit lower-triangular chunk matrix);
- gate_cumsum.py: the gates' cumulative sum within each chunk (Triton);
- state_passes.py: the chunk-state pass (the states entering every chunk, and the final state) and its
  backward (the state gradients), for diagonal gates and for the delta rule;
- output_pass.py: o = scale (q decayed) S + A v, with A given or computed for a scalar gate;
- intra_chunk.py: the PyTorch paths' intra-chunk attention matrix of a vector gate (sub-chunks, no exp > 1);
- chunk_maps.py: a delta rule's state summary, the tree composition of its chunks' affine maps.
Each op's Triton file composes these stages and adds its own part (GLA's intra-chunk attention with a vector
gate, the delta rule's WY factors, KDA's WY factors with a decay per key channel). The Triton modules are imported on first use (CPU-only runs need no Triton).
"""
from kernels.common.chunks import (CHUNK_SIZE, ChunkIndex, ChunkLayout, attach_host_bounds, chunk_index, chunk_layout,
                                   sequence_bounds)
from kernels.common.contract import autograd_vjp, check_recurrent_inputs, compute_dtype, decay_or_zero

__all__ = ["CHUNK_SIZE", "ChunkIndex", "ChunkLayout", "attach_host_bounds", "autograd_vjp", "check_recurrent_inputs",
           "chunk_index", "chunk_layout", "compute_dtype", "decay_or_zero", "sequence_bounds"]
