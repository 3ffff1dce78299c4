"""The mixer registry: every token mixer registers itself once, at the bottom of its own module, with all
that the rest of the system needs to know about it. The model factory (model/lm.py), the config's pattern
letters and checks (model/config.py), FLOP counting (model/flops.py), sequence parallelism
(parallel/sequence.py, through the mixer's recurrent core) and the benchmarks' mixer lists read it here.

Adding a mixer: its settings dataclass with a `check(d_model)` (a field of ModelConfig), its nn.Module
(built from the ModelConfig, with `init_cache(batch_size)` for decoding), and one `register(Mixer(...))`
in its module, which model/lm.py imports.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.nn as nn

    from model.config import ModelConfig


@dataclass(frozen=True)
class RecurrentCore:
    """A recurrent core op family with the state contract of ARCHITECTURE.md ("The recurrent state"):
    o, final_state = op(q, k, v, <gates>, initial_state=None, output_final_state=False, cu_seqlens=None)."""
    kernel: str  # its name among the kernels (bench/gpu_compile.py's ops): gla, gla_scalar, gated_delta_rule, ...
    chunk: Callable  # the chunked op: training, prefill, a sequence-parallel slice
    decode: Callable  # the fused recurrent op: one decode step from a cached state
    state_summary: Callable  # (S_local, transition) of a slice, without outputs: sequence parallelism
    # chunk's input gradients from its output gradient without its forward, (q, k, v, *gates, do, scale=,
    # cu_seqlens=, initial_state=None) -> (dq, dk, dv, [dgates], d initial_state or None): training recomputes
    # around the scan (model/recurrent.py mix; under sequence parallelism from the incoming state); None keeps
    # plain autograd
    chunk_vjp: Callable | None = None
    # how a slice's summary continues an incoming state, (transition, S_local, S_in) -> S_out; None: the affine
    # S_out = M S_in + S_local of parallel/sequence.py (the mLSTM's states each carry their own stabiliser)
    combine: Callable | None = None


@dataclass(frozen=True)
class Mixer:
    name: str  # as config patterns and checkpoints name it
    letter: str  # its letter in model.pattern
    config_key: str  # the ModelConfig field holding its settings (a dataclass with check(d_model))
    build: Callable[[ModelConfig], nn.Module]
    flops: Callable[[nn.Module, int], float]  # forward FLOPs per token of its mixing (beyond projections) at T
    core: RecurrentCore | None = None  # recurrent mixers: the ops its scan runs (None: attention)
    head_dims: Callable[[ModelConfig], tuple[int, int]] | None = None  # recurrent: (K, V) per head of its state
    # Whether it sees the whole sequence (an encoder, model.bidirectional; model/bidirectional.py): "never" (causal
    # only), "optional" (causal, or bidirectional in an encoder: GLA, Mamba2, attention), "always" (LION).
    bidirectional: str = "never"

    @property
    def recurrent(self) -> bool:
        return self.core is not None


MIXERS: dict[str, Mixer] = {}


def register(mixer: Mixer) -> Mixer:
    """Add a mixer; a second one with the same name or letter is a programming error."""
    clash = [m.name for m in MIXERS.values() if m.name == mixer.name or m.letter == mixer.letter]
    if clash:
        raise ValueError(f"mixer {mixer.name!r} ({mixer.letter}) clashes with the registered {clash[0]!r}")
    MIXERS[mixer.name] = mixer
    return mixer


def by_letter() -> dict[str, Mixer]:
    return {m.letter: m for m in MIXERS.values()}
