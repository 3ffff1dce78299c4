"""Load a checkpoint for evaluation: its model, the run's config with overrides (validated like the
training config) and the run's data (for the tokenizer and the held-out split)."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf

from configs.errors import CheckpointError
from configs.schema import BatonConfig, typed
from data import prepare_dataset
from model import LM
from parallel.checkpoint import read_train_state, run_config


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


def load_model(checkpoint: Path, device: torch.device) -> tuple[LM, Optional[int]]:
    """(model, train step or None) of a training checkpoint (one process or FSDP: DCP) or an export
    (model.safetensors + config.json)."""
    if (checkpoint / "model.safetensors").is_file():
        return LM.from_checkpoint(checkpoint, device), None
    state = read_train_state(checkpoint)
    if not (checkpoint / ".metadata").is_file():
        raise CheckpointError(f"{checkpoint}: no torch.distributed.checkpoint metadata (DeepSpeed checkpoints "
                              "need DeepSpeed's zero_to_fp32 first)")
    model = LM.from_config(state["model_config"]).to(device)
    weights = {"model": model.state_dict()}
    dcp.load(weights, checkpoint_id=str(checkpoint))
    model.load_state_dict(weights["model"])
    return model, state["step"]


def load_checkpoint(checkpoint, overrides: list[str] = (), device: Optional[torch.device] = None) -> LoadedCheckpoint:
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: no such checkpoint directory")
    raw = OmegaConf.merge(run_config(checkpoint), OmegaConf.from_dotlist(list(overrides)))
    cfg = typed(raw)  # bad overrides fail here, before any weight is read
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, step = load_model(checkpoint, device)
    model.eval()
    return LoadedCheckpoint(checkpoint, cfg, raw, model, step, prepare_dataset(cfg.data), device)
