"""Exports: one unsharded model as model.safetensors + config.json (the ModelConfig's fields), for
evaluation and sharing; nothing in it is pickled. An export written from a training run also carries the
run's config.yaml (so `python -m eval checkpoint=<export>` scores it on the same data), the data's
tokenizer (under data/shards.py's name) and export.json (the step and the checkpoint it came from).
"""
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_model, save_model

from checkpoints.checkpointer import RUN_CONFIG
from configs.errors import ConfigError
from data.shards import TOKENIZER_FILE
from model import LM

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
EXPORT_INFO = "export.json"


def is_export(directory: Path) -> bool:
    return (Path(directory) / WEIGHTS).is_file()


def save_export(model: LM, directory: Path) -> None:
    """directory/model.safetensors + directory/config.json (an unsharded module)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / WEIGHTS))
    (directory / MODEL_CONFIG).write_text(json.dumps(dataclasses.asdict(model.config), indent=2))


def load_export(directory: Path, device: str | torch.device = "cpu") -> LM:
    directory = Path(directory)
    with torch.device(device):
        model = LM.from_config(json.loads((directory / MODEL_CONFIG).read_text()))
    load_model(model, str(directory / WEIGHTS), device=str(device))
    return model


def check_export_target(out: Path) -> None:
    """An existing non-empty directory is never overwritten by an export (a one-line ConfigError)."""
    if Path(out).exists() and any(Path(out).iterdir()):
        raise ConfigError(f"{out}: exists and is not empty; choose another out=")


def write_export(model: LM, out: Path, run_config: DictConfig, tokenizer_path: Path | None, info: dict) -> Path:
    """The export of a training run at `out`, written to a temporary directory renamed when complete."""
    out = Path(out)
    check_export_target(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_export(model, tmp)
    (tmp / RUN_CONFIG).write_text(OmegaConf.to_yaml(run_config))
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1))
    if out.exists():
        out.rmdir()  # empty, checked above
    os.replace(tmp, out)
    return out
