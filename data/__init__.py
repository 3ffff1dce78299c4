"""Data: tokenizer, shard preparation, and the packed resumable loader.

    ds = prepare_dataset(cfg.data)              # the embedded corpus (prepared once, cached) or prepared shards
    loader = PackedLoader(ds.train_sources, seq_len, micro_batch, global_batch, dp_rank, dp_size,
                          sp_rank, sp_size, seed=..., tokenizer_hash=ds.tokenizer.hash)
    batch = next(loader); loader.state_dict() / loader.load_state_dict(state)
    for tokens, n_bytes in ds.held_out_documents(): ...
"""
import importlib

from data.config import DataConfig, MixtureSource
from data.shards import ShardSet
from data.tokenizer import Tokenizer, TokenizerConfig

# Imported on first use: the loader imports torch (seconds), and `python -m data.prepare` (which
# data.dataset imports) must neither be imported by its own package first nor pull torch into its workers.
LAZY = {"PackedLoader": "data.loader", "PreparedData": "data.dataset", "prepare_dataset": "data.dataset",
        "stdlib_prepare_config": "data.dataset"}

__all__ = ["DataConfig", "MixtureSource", "ShardSet", "Tokenizer", "TokenizerConfig", *LAZY]


def __getattr__(name: str):
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'data' has no attribute '{name}'")
