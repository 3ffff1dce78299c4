"""The typed schema of the whole config, and the one way to load it.

Each group's schema lives with its code (model/config.py, data/config.py, parallel/config.py,
eval/config.py); the training-loop groups live here. Hydra composes configs/config.yaml over this schema, so an unknown key
or a wrong type fails at composition; `OmegaConf.to_object` then builds the dataclasses, whose
__post_init__ rejects impossible values. Nothing is written before this succeeds.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from configs.errors import ConfigError

from data.config import DataConfig
from data.mlm import MLMConfig
from eval.config import EvalConfig
from kernels.common import CHUNK_SIZE
from model.config import ModelConfig
from parallel.config import ParallelConfig

CONFIG_DIR = Path(__file__).resolve().parent
SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("auto", "fp32", "bf16")
OBJECTIVES = ("clm", "mlm")  # next-token prediction (causal models); masked tokens (encoders: data/mlm.py)
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 1337


@dataclass
class OptimConfig:
    lr: float = 8e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: str = "cosine"
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ConfigError("optim.weight_decay, optim.grad_clip and optim.warmup_steps must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"optim.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule: '{self.schedule}' is not one of {', '.join(SCHEDULES)}")
        if not (0 <= self.min_lr_ratio <= 1 and 0 < self.decay_fraction <= 1):
            raise ConfigError("optim.min_lr_ratio must be in [0, 1] and optim.decay_fraction in (0, 1]")


@dataclass
class ProfileConfig:
    steps: list[int] = field(default_factory=list)  # [first, last] optimizer steps to trace; [] = off

    def __post_init__(self):
        if self.steps and (len(self.steps) != 2 or not 1 <= self.steps[0] <= self.steps[1]):
            raise ConfigError(f"train.profile.steps must be [first, last] with 1 <= first <= last, got {self.steps}")


@dataclass
class TrainConfig:
    seq_len: int = 256
    global_batch_size: int = 8
    micro_batch_size: Optional[int] = None  # None: global batch / data-parallel ranks (no accumulation)
    max_steps: int = 560
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    async_checkpoint: bool = True
    eval_every: int = 0
    dtype: str = "auto"
    max_bad_steps: int = 5
    spike_factor: float = 3.0
    compile: bool = False  # regional torch.compile of every block (parallel/compile.py)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    # > 0: loss = cross entropy + distill x KL(teacher || model), the teacher being the frozen base model a LoRA
    # run fine-tunes (a linearized model's Transformer: model/liger.py teacher_mode)
    distill: float = 0.0
    # clm: next token (causal models); mlm: masked tokens (encoders, data/mlm.py); null: mlm for an encoder, else clm
    objective: Optional[str] = None
    mlm: MLMConfig = field(default_factory=MLMConfig)

    def __post_init__(self):
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ConfigError(f"train.objective: '{self.objective}' is not one of {', '.join(OBJECTIVES)}")
        for name in ("seq_len", "global_batch_size", "max_steps", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"train.micro_batch_size must be >= 1 or null, got {self.micro_batch_size}")
        if self.checkpoint_every < 0 or self.eval_every < 0 or self.keep_checkpoints < 1:
            raise ConfigError("train.checkpoint_every and train.eval_every must be >= 0, train.keep_checkpoints >= 1")
        if self.dtype not in DTYPES:
            raise ConfigError(f"train.dtype: '{self.dtype}' is not one of {', '.join(DTYPES)}")
        if self.spike_factor <= 1:
            raise ConfigError(f"train.spike_factor must be > 1, got {self.spike_factor}")
        if self.distill < 0:
            raise ConfigError(f"train.distill must be >= 0, got {self.distill}")


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "baton"
    entity: Optional[str] = None
    name: Optional[str] = None

    def __post_init__(self):
        if self.mode not in WANDB_MODES:
            raise ConfigError(f"logging.wandb.mode: '{self.mode}' is not one of {', '.join(WANDB_MODES)}")


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class BatonConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resume: str = "none"
    # init.from: the weights a new run starts from (a Baton export or a Hugging Face model directory,
    # checkpoints/initial.py) instead of the seed's; a dict because `from` is a Python keyword.
    # init.linearize=liger: those weights' attention layers become Liger layers (model/liger.py), but every Nth
    # layer stays attention with init.keep_attention_every=N (Liger-H); see linearize_settings.
    init: Dict[str, Optional[str]] = field(default_factory=lambda: {"from": None, "linearize": None,
                                                                    "keep_attention_every": None})

    def __post_init__(self):
        # Each recurrent layer's slice (T / sp tokens) must be whole kernel chunks.
        if self.model.has_recurrent_layers():
            step = CHUNK_SIZE * self.parallel.sp
            if self.train.seq_len % step:
                raise ConfigError(f"train.seq_len={self.train.seq_len} must be divisible by {step} "
                                 f"(kernel chunk {CHUNK_SIZE} x parallel.sp {self.parallel.sp})")
        elif self.train.seq_len % self.parallel.sp:
            raise ConfigError(f"train.seq_len={self.train.seq_len} must be divisible by parallel.sp={self.parallel.sp}")
        # An encoder sees the token it would predict next: it trains on masked tokens, a causal model on the next.
        if self.train.objective is None:
            self.train.objective = "mlm" if self.model.is_encoder else "clm"
        if self.model.is_encoder and self.train.objective != "mlm":
            raise ConfigError("the model is an encoder (bidirectional: a LION letter or model.bidirectional=true): "
                              "train it with train.objective=mlm")
        if self.train.objective == "mlm" and not self.model.is_encoder:
            raise ConfigError("train.objective=mlm needs an encoder (a LION letter F/N/B, or model.bidirectional=true)")
        if self.train.objective == "mlm" and self.data.source not in ("stdlib", "shards"):
            raise ConfigError(f"train.objective=mlm needs text data (stdlib or shards), not data.source={self.data.source}")
        if self.train.micro_batch_size and self.train.global_batch_size % self.train.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={self.train.global_batch_size} must be a multiple of "
                             f"train.micro_batch_size={self.train.micro_batch_size}")
        linearize_settings(self.init)
        if self.train.distill and not self.model.lora.rank:
            raise ConfigError("train.distill needs LoRA (model.lora.rank > 0): the frozen base weights are the teacher")


LINEARIZE_METHODS = ("liger",)


def linearize_settings(init) -> tuple[Optional[str], Optional[int]]:
    """(init.linearize, init.keep_attention_every as an int), checked: a known method, only with init.from, and
    N >= 2 (a one-line ConfigError otherwise)."""
    method, keep = init.get("linearize"), init.get("keep_attention_every")
    if method is None:
        if keep is not None:
            raise ConfigError("init.keep_attention_every needs init.linearize=liger")
        return None, None
    if method not in LINEARIZE_METHODS:
        raise ConfigError(f"init.linearize: '{method}' is not one of {', '.join(LINEARIZE_METHODS)}")
    if not init.get("from"):
        raise ConfigError(f"init.linearize={method} needs init.from=<a Transformer's weights: a Baton export or a "
                          "Hugging Face model directory>")
    if keep is None:
        return method, None
    try:
        every = int(str(keep))
    except ValueError:
        every = 0
    if every < 2:
        raise ConfigError(f"init.keep_attention_every must be an integer >= 2 (every Nth layer stays attention), "
                          f"got {keep}")
    return method, every


ConfigStore.instance().store(name="baton_schema", node=BatonConfig)


def load_config(overrides: list[str]) -> tuple[BatonConfig, DictConfig]:
    """Compose configs/config.yaml with command-line overrides; return (typed config, resolved DictConfig)."""
    raw = compose_config(overrides)
    return typed(raw), raw


def compose_config(overrides: list[str]) -> DictConfig:
    """configs/config.yaml with command-line overrides, composed (unknown keys and wrong types fail here) but not
    yet checked as a whole: for a caller that fills in more first (train.py: init.from's model)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)


def typed(raw: DictConfig) -> BatonConfig:
    """Check a composed config against the schema and build its dataclasses (running their checks)."""
    OmegaConf.resolve(raw)
    schema = OmegaConf.structured(BatonConfig)
    _reject_unknown_keys(raw, schema, "")
    return OmegaConf.to_object(OmegaConf.merge(schema, raw))


def _reject_unknown_keys(node: DictConfig, schema: DictConfig, prefix: str) -> None:
    """Hydra lets `+group.key=value` add a key to a typed node; the schema must still have it."""
    for key in node.keys():
        if key not in schema:
            raise ConfigError(f"{prefix}{key}: no such key in the schema")
        child, template = node[key], schema[key]
        if isinstance(child, DictConfig) and isinstance(template, DictConfig):
            _reject_unknown_keys(child, template, f"{prefix}{key}.")
