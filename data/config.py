"""The `data` config group: which tokenized data a run trains on (configs/data/*.yaml)."""
from dataclasses import dataclass, field
from typing import List, Optional

from configs.errors import ConfigError
from data.shards import VERIFY_MODES

# mqar, passkey, state_tracking: generated on the fly (data/synthetic.py)
SOURCES = ("stdlib", "shards", "mqar", "passkey", "state_tracking")
STATE_TRACKING_GROUPS = {"parity": 2, "s3": 3, "s5": 5}  # data.group: the symmetric group S_n it names


def check_group(group: str, key: str) -> None:
    """A state-tracking group name (`key` names the setting in the error)."""
    if group not in STATE_TRACKING_GROUPS:
        raise ConfigError(f"{key}: '{group}' is not one of {', '.join(STATE_TRACKING_GROUPS)}")


def option(default, help: str):
    """A dataclass field with a help text (the `python -m data.prepare --help` listing)."""
    return field(default=default, metadata={"help": help})


@dataclass
class MixtureSource:
    """One prepared dataset of a mixture and its share of the training tokens."""
    path: str
    weight: float = 1.0

    def __post_init__(self):
        if not self.weight > 0:
            raise ValueError(f"data.mixture: weight of {self.path} must be > 0, got {self.weight}")


@dataclass
class DataConfig:
    # stdlib: the embedded default corpus (this Python's standard library), prepared once under cache_dir;
    # shards: a directory prepared by `python -m data.prepare` (data.path), or several mixed by weight
    # (data.mixture=[{path: a, weight: 0.7}, {path: b, weight: 0.3}]).
    source: str = "stdlib"
    path: Optional[str] = None
    mixture: List[MixtureSource] = field(default_factory=list)
    cache_dir: str = ".cache/data"
    # source=stdlib: tokenizer size, held-out share (split by file), prepare worker processes (0: all cores).
    vocab_size: int = 8192
    # source=stdlib: tokenize with this tokenizer instead of training one (vocab_size is then not used): a
    # sentencepiece .model or a Hugging Face tokenizer.json, e.g. an imported model's (init.from sets it).
    tokenizer: Optional[str] = None
    held_out_fraction: float = 0.02
    workers: int = 0
    # source=mqar: the task's vocabulary is vocab_size (no tokenizer); keys queried per row, gap power law.
    num_kv_pairs: int = 8
    power_a: float = 0.01
    # source=state_tracking: the word problem of parity, s3 or s5 (data/synthetic.py); the vocabulary is the
    # group's elements (vocab_size is not used).
    group: str = "parity"
    # How a run checks the shards when it opens them. full: the job's rank 0 (RANK) hashes every file (sha256,
    # ~1 GB/s: about 17 minutes per TB) against the manifest, the other ranks check sizes and counts only;
    # sizes: no rank hashes (prepare already checksummed what it wrote).
    verify: str = "full"

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"data.source: '{self.source}' is not one of {', '.join(SOURCES)}")
        if self.source == "shards" and (self.path is None) == (not self.mixture):
            raise ValueError("data.path: source=shards needs exactly one of data.path=<prepared dir> "
                             "or data.mixture=[...]")
        if self.source == "stdlib" and (self.path is not None or self.mixture):
            raise ValueError("data.path / data.mixture are only used with data.source=shards")
        if not (4 if self.source == "mqar" else 256 + 4) <= self.vocab_size <= 2**32:
            raise ValueError(f"data.vocab_size must hold the 256 byte-fallback pieces and the specials, "
                             f"got {self.vocab_size}")
        if self.source == "state_tracking":
            check_group(self.group, "data.group")
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(f"data.held_out_fraction must be in (0, 1), got {self.held_out_fraction}")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"data.verify: '{self.verify}' is not one of {', '.join(VERIFY_MODES)}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0 (0: all cores), got {self.workers}")
        paths = [m.path for m in self.mixture]
        if len(set(paths)) != len(paths):
            raise ValueError(f"data.mixture lists a path twice: {paths}")
