"""Read a local Hugging Face causal-LM checkpoint (config.json, safetensors, single or sharded) as Baton's: its
model config and its tensors under Baton's names (checkpoints/hf/architectures.py), one tensor at a time, and
write it out as a Baton export with the model's own tokenizer (`python -m scripts.import_hf`)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from checkpoints.hf.architectures import ARCHITECTURES, baton_model_config, to_baton_name
from configs.errors import CheckpointError

HF_CONFIG = "config.json"
SINGLE_FILE, SHARD_INDEX = "model.safetensors", "model.safetensors.index.json"
# The tokenizer files a model directory may carry; tokenizer.json is the one Baton's data pipeline reads.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def is_hf_checkpoint(directory: Path) -> bool:
    """A transformers model directory: its config.json names a model_type (a Baton export's names fields)."""
    config = Path(directory) / HF_CONFIG
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_hf_config(directory: Path):
    """The checkpoint's transformers config, parsed by transformers (which also reads older key spellings such
    as a top-level rope_theta / rope_scaling); an unknown model type is a one-line CheckpointError."""
    from transformers import AutoConfig

    directory = Path(directory)
    if not (directory / HF_CONFIG).is_file():
        raise CheckpointError(f"{directory}: no {HF_CONFIG} (not a Hugging Face model directory)")
    model_type = json.loads((directory / HF_CONFIG).read_text()).get("model_type")
    if model_type not in {a.model_type for a in ARCHITECTURES.values()}:
        raise CheckpointError(f"{directory}: model_type {model_type!r} is not supported (supported: "
                              f"{', '.join(ARCHITECTURES)})")
    return AutoConfig.from_pretrained(str(directory), local_files_only=True)


class HFWeights:
    """The tensors of an HF checkpoint by Baton name, read lazily from its safetensors file(s)."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        self.model_config, self.architecture = baton_model_config(read_hf_config(directory))
        self.directory = directory
        self.files = self._shard_files(directory)  # HF name -> file
        self.names = {to_baton_name(name): name for name in self.files}  # an unknown key fails here, by name

    @staticmethod
    def _shard_files(directory: Path) -> dict[str, Path]:
        if (directory / SHARD_INDEX).is_file():
            weight_map = json.loads((directory / SHARD_INDEX).read_text())["weight_map"]
            files = {name: directory / file for name, file in weight_map.items()}
            missing = sorted({str(f) for f in files.values() if not f.is_file()})
            if missing:
                raise CheckpointError(f"{missing[0]}: shard listed in {SHARD_INDEX} is missing")
            return files
        if (directory / SINGLE_FILE).is_file():
            with safe_open(str(directory / SINGLE_FILE), "pt") as f:
                return {name: directory / SINGLE_FILE for name in f.keys()}
        raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {SHARD_INDEX} (only safetensors weights are read)")

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Baton name, tensor) pairs, each file opened once."""
        with ExitStack() as stack:
            handles = {}
            for baton_name, hf_name in self.names.items():
                path = self.files[hf_name]
                if path not in handles:
                    handles[path] = stack.enter_context(safe_open(str(path), "pt"))
                yield baton_name, handles[path].get_tensor(hf_name)

    def tokenizer_files(self) -> list[Path]:
        return [self.directory / name for name in TOKENIZER_FILES if (self.directory / name).is_file()]
