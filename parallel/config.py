"""Schema of the `parallel` config group: how ranks are laid out and which engine shards the model."""
from dataclasses import dataclass

ENGINES = ("none", "fsdp", "deepspeed")


@dataclass
class ParallelConfig:
    engine: str = "none"
    dp_replicate: int = 1
    dp_shard: int = -1
    sp: int = 1

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"parallel.engine: '{self.engine}' is not one of {', '.join(ENGINES)}")
        if self.dp_replicate < 1 or self.sp < 1:
            raise ValueError("parallel.dp_replicate and parallel.sp must be >= 1")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError(f"parallel.dp_shard: {self.dp_shard} (use -1 for 'the rest of the world size' or >= 1)")
