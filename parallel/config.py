"""Schema of the `parallel` config group: how ranks are laid out and which engine shards the model."""
from dataclasses import dataclass

from configs.errors import ConfigError

ENGINES = ("auto", "none", "fsdp", "deepspeed")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")  # parallel/activation_checkpointing.py
# Older configs said true / false: every block or none (what they did under FSDP and DeepSpeed).
ACTIVATION_CHECKPOINTING_BOOLEANS = {"true": "full", "false": "none"}


@dataclass
class ParallelConfig:
    engine: str = "auto"  # auto: none in a single process, fsdp under torchrun
    dp_replicate: int = 1  # HSDP replicas (FSDP only; typically one per node group)
    dp_shard: int = -1  # -1: whatever the world size leaves after dp_replicate and sp
    sp: int = 1  # sequence-parallel ranks per row
    zero_stage: int = 2  # deepspeed: ZeRO stage 1, 2 or 3
    activation_checkpointing: str = "none"  # none | full (every block) | selective (every Nth block)
    activation_checkpointing_every: int = 2  # selective: recompute blocks N-1, 2N-1, ... in the backward
    reshard_after_forward: bool = True  # fsdp, deepspeed ZeRO-3: free gathered block weights after forward
    mixed_precision: bool = True  # on CUDA: bf16 parameters in compute, fp32 gradient reduction
    timeout_s: float = 600  # a collective waiting longer (a hung or dead rank) ends the job with an error

    def __post_init__(self):
        mode = str(self.activation_checkpointing).lower()
        self.activation_checkpointing = ACTIVATION_CHECKPOINTING_BOOLEANS.get(mode, mode)
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ConfigError(f"parallel.activation_checkpointing: '{mode}' is not one of "
                              f"{', '.join(ACTIVATION_CHECKPOINTING)} (true / false: full / none)")
        if self.activation_checkpointing_every < 1:
            raise ConfigError(f"parallel.activation_checkpointing_every must be >= 1, got "
                              f"{self.activation_checkpointing_every}")
        if self.engine not in ENGINES:
            raise ConfigError(f"parallel.engine: '{self.engine}' is not one of {', '.join(ENGINES)}")
        if self.dp_replicate < 1 or self.sp < 1:
            raise ConfigError("parallel.dp_replicate and parallel.sp must be >= 1")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ConfigError(f"parallel.dp_shard: {self.dp_shard} (use -1 for 'the rest of the world size' or >= 1)")
        if self.timeout_s <= 0:
            raise ConfigError(f"parallel.timeout_s must be positive, got {self.timeout_s}")
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        if self.engine == "deepspeed" and self.dp_replicate > 1:
            raise ConfigError("parallel.dp_replicate > 1 (HSDP) needs parallel.engine=fsdp")
