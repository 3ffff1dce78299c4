"""The weights a run starts from (`init.from=`): a Baton export or a Hugging Face model directory, read one
tensor at a time under Baton's names, and copied into a model however an engine holds it (whole, FSDP2's
DTensor shards, the row shards ZeRO-3 takes over). The model config must match the weights: the first name
that is missing, extra or of another shape is refused in one line."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from checkpoints.export import MODEL_CONFIG, WEIGHTS, is_export
from checkpoints.hf.importer import HFWeights, is_hf_checkpoint
from configs.errors import CheckpointError, ConfigError
from model.lora import is_lora_parameter


class ExportWeights:
    """The tensors of a Baton export (model.safetensors under Baton's names; the model config is its config.json,
    or that file's `baton` entry in a Hugging Face export with Baton's remote code)."""

    def __init__(self, directory: Path, model_config: dict):
        self.directory = Path(directory)
        self.model_config = model_config

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        with safe_open(str(self.directory / WEIGHTS), "pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def open_weights(path: str | Path) -> ExportWeights | HFWeights:
    """The weights at `path`: a Baton export (either format), or an HF model directory
    (checkpoints/hf/importer.py)."""
    path = Path(path)
    if is_export(path):
        return ExportWeights(path, json.loads((path / MODEL_CONFIG).read_text()))
    if is_hf_checkpoint(path):
        config = json.loads((path / MODEL_CONFIG).read_text())
        if config.get("model_type") == "baton" and (path / WEIGHTS).is_file():  # Baton's remote-code export
            return ExportWeights(path, config["baton"])
        return HFWeights(path)
    raise CheckpointError(f"init.from={path}: neither a Baton export (model.safetensors + config.json) nor a "
                          "Hugging Face model directory")


def copy_full(target: torch.Tensor, full: torch.Tensor) -> None:
    """Write a full tensor into a parameter as its engine holds it: a DTensor keeps its own shard of it (every
    rank holds the same full tensor, so each cuts its shard locally, no communication), a plain tensor all."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(target, DTensor):
            local = distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
            target.to_local().copy_(local.to_local())
        else:
            target.copy_(full)


def load_weights(model: torch.nn.Module, source) -> None:
    """Fill every parameter of `model` (possibly sharded) from `source`; a CheckpointError names the first
    tensor the model lacks, the first parameter the weights lack, or the first shape that differs. LoRA's A and B
    (model/lora.py) are not in a model's weights: they keep their init (B = 0, so the model is the weights')."""
    params = dict(model.named_parameters())
    by_identity = {id(param): name for name, param in params.items()}
    # A tied parameter's second name (lm_head.weight = embed.weight): an export may hold either.
    aliases = {name: by_identity[id(tensor)] for name, tensor in model.state_dict(keep_vars=True).items()
               if name not in params and id(tensor) in by_identity}
    filled = set()
    for name, tensor in source.items():
        name = aliases.get(name, name)
        if name in filled:
            continue
        if name not in params:
            raise CheckpointError(f"{name}: in the weights but not in the model (the model config does not match "
                                  "the weights)")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise CheckpointError(f"{name}: shape {tuple(tensor.shape)} in the weights, "
                                  f"{tuple(params[name].shape)} in the model")
        copy_full(params[name], tensor)
        filled.add(name)
    missing = [name for name in params if name not in filled and not is_lora_parameter(name)]
    if missing:
        raise CheckpointError(f"{missing[0]}: a parameter of the model that the weights lack (the model config does "
                              "not match the weights)")


def import_export(source_dir: Path, out: Path) -> Path:
    """A Baton export of the model at `source_dir` (an HF model directory, or an export of either format): its
    weights in fp32, its tokenizer.json (the data pipeline tokenizes with it: data.tokenizer), and a run config
    whose data is the stdlib corpus in the model's own ids, so `python -m eval checkpoint=out` and
    `train.py init.from=out` work as they are. Nothing is written unless all of it reads."""
    from checkpoints.export import check_export_target, write_export
    from configs.schema import load_config
    from data.tokenizer import HFTokenizer
    from model import LM

    source_dir, out = Path(source_dir), Path(out)
    check_export_target(out)
    source = open_weights(source_dir)
    model = LM.from_config(source.model_config)
    load_weights(model, source)
    tokenizer = None
    if (source_dir / "tokenizer.json").is_file():
        try:
            tokenizer = HFTokenizer(source_dir / "tokenizer.json")
        except ValueError as err:
            raise CheckpointError(str(err)) from None
    overrides = [f"data.tokenizer={out.resolve() / 'tokenizer.json'}"] if tokenizer is not None else []
    _, run_config = load_config(overrides)
    run_config.model = OmegaConf.structured(model.config)
    info = {"imported_from": str(source_dir.resolve()), "architecture": getattr(source, "architecture", None)
            and source.architecture.hf_class}
    return write_export(model.float(), out, run_config, tokenizer, info)


def apply_init_from(raw_cfg, overrides: list[str]) -> None:
    """Point a run config with init.from at its weights, in place: unless the command line chose a model preset
    (model=...), the model is the weights' own config with the command line's model.* overrides on top; and
    the stdlib corpus, unless told otherwise, is tokenized with the weights' tokenizer.json. With init.linearize,
    the model is then linearized (linearize_model_config)."""
    from configs.schema import linearize_settings
    from model.config import ModelConfig

    method, keep_attention_every = linearize_settings(raw_cfg.init)
    path = raw_cfg.init["from"]
    if not path:
        return
    source = open_weights(path)
    if not any(o.startswith("model=") for o in overrides):
        model_overrides = [o for o in overrides if o.startswith("model.")]
        raw_cfg.model = OmegaConf.merge(OmegaConf.structured(ModelConfig), source.model_config,
                                        OmegaConf.from_dotlist([o[len("model."):] for o in model_overrides]))
    if method is not None:
        linearize_model_config(raw_cfg.model, keep_attention_every)
    tokenizer = Path(path) / "tokenizer.json"
    if raw_cfg.data.source == "stdlib" and raw_cfg.data.get("tokenizer") is None and tokenizer.is_file():
        raw_cfg.data.tokenizer = str(tokenizer.resolve())


def linearize_model_config(model_cfg, keep_attention_every: int | None) -> None:
    """init.linearize=liger, in place on the run's model config: the teacher's with each full-attention layer (A) a
    Liger layer (Z, model/liger.py), every keep_attention_every-th kept (Liger-H); the pattern spelled out per
    layer. The weights load unchanged (a Liger layer has an attention layer's parameters); only LoRA's are new."""
    from model.config import ModelConfig
    from model.liger import linearized_pattern
    from model.registry import MIXERS

    typed_model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), model_cfg))
    letters = [MIXERS[name].letter for name in typed_model.layer_mixers()]
    if "A" not in letters:
        raise ConfigError(f"init.linearize=liger: the model ({''.join(letters)}) has no full-attention layer (A) to "
                          "linearize")
    pattern = linearized_pattern(letters, keep_attention_every)
    if "Z" not in pattern:
        raise ConfigError(f"init.keep_attention_every={keep_attention_every} keeps every attention layer of "
                          f"{''.join(letters)}: nothing to linearize")
    model_cfg.pattern, model_cfg.n_layers = pattern, len(pattern)
    model_cfg.name, model_cfg.expected_params = f"{typed_model.name}_liger", None
