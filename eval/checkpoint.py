"""Load a checkpoint for evaluation: its model, the run's config with overrides (validated like the
training config) and the run's data (for the tokenizer and the held-out split)."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from checkpoints import is_export, load_model, read_train_state, run_config
from configs.errors import CheckpointError
from configs.schema import BatonConfig, typed
from data import prepare_dataset
from model import LM


@dataclass
class LoadedCheckpoint:
    path: Path
    cfg: BatonConfig
    raw: DictConfig
    model: LM
    step: Optional[int]     # None for an export
    dataset: object         # data.PreparedData or data.synthetic.SyntheticData
    device: torch.device

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return torch.bfloat16 if self.device.type == "cuda" else None


def load_checkpoint(checkpoint, overrides: list[str] = (), device: Optional[torch.device] = None) -> LoadedCheckpoint:
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: no such checkpoint directory")
    raw = OmegaConf.merge(run_config(checkpoint), OmegaConf.from_dotlist(list(overrides)))
    cfg = typed(raw)  # bad overrides fail here, before any weight is read
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(checkpoint, device).eval()  # any engine's checkpoint, or an export
    step = None if is_export(checkpoint) else read_train_state(checkpoint)["step"]
    return LoadedCheckpoint(checkpoint, cfg, raw, model, step, prepare_dataset(cfg.data), device)
