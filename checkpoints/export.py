"""Exports: one unsharded model as model.safetensors + config.json (the ModelConfig's fields), for
evaluation and sharing; nothing in it is pickled. An export written from a training run also carries the
run's config.yaml (so `python -m eval checkpoint=<export>` scores it on the same data), the data's
tokenizer (tokenizer.model, or a Hugging Face tokenizer.json with its config) and export.json (the step and
the checkpoint it came from). format=hf writes what `transformers` loads instead (checkpoints/hf/exporter.py).
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
from checkpoints.hf.exporter import write_hf_export
from configs.errors import ConfigError
from data.tokenizer import tokenizer_file_name
from model import LM
from model.lora import merge_lora

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
EXPORT_INFO = "export.json"


FORMATS = ("baton", "hf")


def is_export(directory: Path) -> bool:
    """A Baton export: model.safetensors beside Baton's config.json (a Hugging Face one names a model_type)."""
    directory = Path(directory)
    if not (directory / WEIGHTS).is_file() or not (directory / MODEL_CONFIG).is_file():
        return False
    try:
        return "model_type" not in json.loads((directory / MODEL_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


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


def write_export(model: LM, out: Path, run_config: DictConfig | None, tokenizer, info: dict,
                 format: str = "baton") -> Path:
    """The export of `model` at `out` (format baton or hf), with the run's config (baton format) and the
    tokenizer's files, written to a temporary directory renamed when complete. A LoRA model is exported merged
    (model/lora.py merge_lora: W + (alpha / r) B A, model.lora off), in the config.yaml too."""
    out = Path(out)
    check_export_target(out)
    if format not in FORMATS:
        raise ConfigError(f"format={format}: not one of {', '.join(FORMATS)}")
    if model.config.lora.rank:
        model = merge_lora(model)
        info = {**info, "lora_merged": True}
        if run_config is not None:  # the merged model, and no distillation (its teacher was the LoRA base)
            run_config = run_config.copy()
            run_config.model = OmegaConf.structured(model.config)
            run_config.train.distill = 0.0
    if format == "hf":
        return write_hf_export(model, out, tokenizer, info)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_export(model, tmp)
    if run_config is not None:
        (tmp / RUN_CONFIG).write_text(OmegaConf.to_yaml(run_config))
    if tokenizer is not None:
        for file in tokenizer.files():  # the main file under the name data/ looks for, its config as it is
            shutil.copyfile(file, tmp / (tokenizer_file_name(file) if file == tokenizer.path else file.name))
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1))
    if out.exists():
        out.rmdir()  # empty, checked above
    os.replace(tmp, out)
    return out
