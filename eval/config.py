"""The `eval` config group: which tasks run (at the end of training, every train.eval_every steps and in
`python -m eval`) and each task's settings (configs/eval/default.yaml). Settings left null follow the run:
lengths from train.seq_len, the MQAR vocabulary from the run's data."""
from dataclasses import dataclass, field
from typing import List, Optional

from configs.errors import ConfigError

TASKS = ("ppl", "passkey", "mqar", "state_tracking", "mlm")
ENCODER_TASKS = ("mlm",)  # what an encoder (model.is_encoder) runs; the others are causal-LM tasks
# by data.source; text data: ["ppl"]
DEFAULT_TASKS = {"mqar": ["mqar"], "passkey": ["passkey"], "state_tracking": ["state_tracking"]}


@dataclass
class PerplexityConfig:
    max_len: Optional[int] = None       # the per-position curve runs out to this; null: 4 x train.seq_len
    num_buckets: int = 24               # log-spaced position buckets over [1, max_len]
    max_documents: int = 16             # held-out documents of at least max_len tokens scored for the curve
    chunk_len: Optional[int] = None     # tokens per forward, the state carried between them; null: train.seq_len


@dataclass
class PasskeyConfig:
    lengths: Optional[List[int]] = None  # prompt lengths in tokens; null: train.seq_len x 1/2, 1, 2, 4
    depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # needle position
    keys_per_cell: int = 4
    seed: int = 0
    jrt: bool = False                   # repeat the context before the question ("just read twice")


@dataclass
class MQARConfig:
    # null: the run's (data=mqar: its data.vocab_size, num_kv_pairs, power_a; other data: the tokenizer's
    # vocabulary, 8 pairs, 0.01) and train.seq_len
    vocab_size: Optional[int] = None
    num_kv_pairs: Optional[int] = None
    seq_len: Optional[int] = None
    power_a: Optional[float] = None
    num_examples: int = 256
    seed: int = 0
    jrt: bool = False                   # repeat the key-value pairs before the queries


@dataclass
class StateTrackingConfig:
    group: Optional[str] = None         # parity, s3 or s5; null: data=state_tracking's data.group, else parity
    lengths: Optional[List[int]] = None  # test lengths; null: train.seq_len x 1, 2, 4
    num_examples: int = 256             # sequences per length
    seed: int = 1                       # its own stream (the training rows are run.seed's)


@dataclass
class MLMEvalConfig:
    mask_rate: float = 0.15             # share of each held-out row's positions masked and scored (data/mlm.py)
    seed: int = 0


@dataclass
class EvalConfig:
    tasks: Optional[List[str]] = None   # null: what the data is for: ppl (text; mlm for an encoder), mqar, passkey
    held_out_tokens: int = 150_000
    batch_size: int = 8
    sample_prompt: str = "def "
    sample_tokens: int = 96
    sample_temperature: float = 0.8
    ppl: PerplexityConfig = field(default_factory=PerplexityConfig)
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)
    mqar: MQARConfig = field(default_factory=MQARConfig)
    state_tracking: StateTrackingConfig = field(default_factory=StateTrackingConfig)
    mlm: MLMEvalConfig = field(default_factory=MLMEvalConfig)

    def __post_init__(self):
        if self.held_out_tokens < 1 or self.batch_size < 1 or self.sample_tokens < 0 or self.sample_temperature < 0:
            raise ConfigError("eval.held_out_tokens and eval.batch_size must be >= 1, sample_tokens/temperature >= 0")
        unknown = [t for t in self.tasks or () if t not in TASKS]
        if unknown or (self.tasks is not None and len(set(self.tasks)) != len(self.tasks)):
            raise ConfigError(f"eval.tasks: {', '.join(unknown) or 'a task listed twice'}: "
                              f"the tasks are {', '.join(TASKS)}")
        p, k, m = self.ppl, self.passkey, self.mqar
        if (p.max_len is not None and p.max_len < 2) or p.num_buckets < 1 or p.max_documents < 1 or (
                p.chunk_len is not None and p.chunk_len < 1):
            raise ConfigError("eval.ppl: max_len must be >= 2, num_buckets, max_documents and chunk_len >= 1")
        if (k.lengths is not None and (not k.lengths or min(k.lengths) < 1)) or not k.depths or k.keys_per_cell < 1:
            raise ConfigError("eval.passkey: lengths must be >= 1, depths non-empty, keys_per_cell >= 1")
        if not all(0 <= d <= 1 for d in k.depths):
            raise ConfigError(f"eval.passkey.depths must be in [0, 1], got {list(k.depths)}")
        if m.num_examples < 1:
            raise ConfigError(f"eval.mqar.num_examples must be >= 1, got {m.num_examples}")
        st = self.state_tracking
        if (st.lengths is not None and (not st.lengths or min(st.lengths) < 1)) or st.num_examples < 1:
            raise ConfigError("eval.state_tracking: lengths must be >= 1 (and not empty), num_examples >= 1")
        if not 0 < self.mlm.mask_rate < 1:
            raise ConfigError(f"eval.mlm.mask_rate must be in (0, 1), got {self.mlm.mask_rate}")
