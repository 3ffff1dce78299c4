"""What a run trains and evaluates on: the embedded corpus (prepared once, cached) or prepared shards."""
import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from data.config import DataConfig, MixtureSource
from data.prepare import PrepareConfig, prepare_shards
from data.shards import FORMAT_VERSION, ShardSet, read_manifest
from data.synthetic import SYNTHETIC_SOURCES, prepare_synthetic
from data.tokenizer import Tokenizer, TokenizerConfig, open_tokenizer


@dataclass
class PreparedData:
    train_sources: list[tuple[Path, float]]   # (train split directory, mixture weight)
    held_out_dirs: list[Path]
    tokenizer: Tokenizer
    verify: str = "full"  # data.verify: full | sizes
    _held_out: list[ShardSet] = field(default_factory=list, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def loader(self, seq_len: int, micro_batch_size: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
               sp_rank: int = 0, sp_size: int = 1, seed: int = 0):
        """This rank's training loader: packed rows of the training split (data=mqar / passkey: generated rows,
        data/synthetic.py). Same arguments and state_dict()/load_state_dict() for every source."""
        from data.loader import PackedLoader

        return PackedLoader(self.train_sources, seq_len, micro_batch_size, global_batch_size, dp_rank, dp_size,
                            sp_rank, sp_size, seed=seed, tokenizer_hash=self.tokenizer.hash, verify=self.verify)

    @property
    def train_dir(self) -> Path:
        if len(self.train_sources) > 1:
            raise ValueError("data.mixture: several training directories; use PreparedData.train_sources")
        return self.train_sources[0][0]

    @property
    def held_out_dir(self) -> Path:
        return self.held_out_dirs[0]

    def held_out_documents(self) -> Iterator[tuple[np.ndarray, int]]:
        """Held-out documents of every dataset: (token ids int64, UTF-8 bytes of the text)."""
        if not self._held_out:
            self._held_out = [ShardSet(d, self.tokenizer.hash, self.verify) for d in self.held_out_dirs]
        for shards in self._held_out:
            yield from shards.documents()


def stdlib_prepare_config(cfg: DataConfig) -> PrepareConfig:
    """The embedded corpus: small shards (so it still shuffles by shard) and a tokenizer trained on ~10 MB."""
    settings = PrepareConfig(
        format="stdlib", out="-", held_out_fraction=cfg.held_out_fraction, shard_size_tokens=1_000_000,
        workers=cfg.workers, tokenizer=TokenizerConfig(path=cfg.tokenizer, vocab_size=cfg.vocab_size,
                                                       sample_fraction=0.35, sample_bytes=12_000_000))
    # A given tokenizer by its content, not only its path: another file there is another dataset.
    identity = [settings.settings(), open_tokenizer(cfg.tokenizer).hash] if cfg.tokenizer else settings.settings()
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    # The format version in the name: a newer format prepares afresh beside the old cache.
    name = f"stdlib-{version}-format{FORMAT_VERSION}-{key}"
    return dataclasses.replace(settings, out=str(Path(cfg.cache_dir) / name))


def prepare_dataset(cfg: DataConfig, progress: bool = True) -> PreparedData:
    """source=stdlib: prepare the embedded corpus once (cached, safe to call from every rank at once);
    source=shards: check the prepared directories (manifest, shared tokenizer); source=mqar / passkey: the
    generated task (data/synthetic.py). Returns where the data is."""
    if cfg.source in SYNTHETIC_SOURCES:
        return prepare_synthetic(cfg)
    if cfg.source == "stdlib":
        roots = [(prepare_shards(stdlib_prepare_config(cfg), progress=progress), 1.0)]
    else:
        mixture = cfg.mixture or [MixtureSource(cfg.path)]
        roots = [(Path(m.path), m.weight) for m in mixture]
    manifests = [read_manifest(root) for root, _ in roots]
    if len({m["tokenizer_hash"] for m in manifests}) > 1:
        raise ValueError(f"data.mixture: datasets prepared with different tokenizers: {[str(r) for r, _ in roots]}")
    tokenizer = open_tokenizer(roots[0][0] / manifests[0]["tokenizer"])
    if tokenizer.hash != manifests[0]["tokenizer_hash"]:
        raise ValueError(f"{tokenizer.path}: differs from the tokenizer its manifest records (hash mismatch)")
    return PreparedData([(root / "train", weight) for root, weight in roots], [root / "held_out" for root, _ in roots],
                        tokenizer, cfg.verify)
