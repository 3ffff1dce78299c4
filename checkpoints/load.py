"""Any checkpoint into one whole model in this process: an export, or a training checkpoint of any engine
(one process, FSDP at any world size, DeepSpeed ZeRO 1/2/3). Nothing is unpickled."""
from pathlib import Path

import torch

from checkpoints import dcp, deepspeed
from checkpoints.checkpointer import read_train_state, refusing_bad_files
from checkpoints.export import is_export, load_export
from checkpoints.hf.importer import is_hf_checkpoint
from checkpoints.initial import load_weights, open_weights
from configs.errors import CheckpointError
from model import LM


def load_model(directory: Path, device: str | torch.device = "cpu") -> LM:
    """The model of an export (Baton's or Hugging Face's format, or an HF model directory Baton imports) or of
    a complete training checkpoint; a directory that is none of these, or holds anything but plain tensors,
    raises one CheckpointError."""
    directory = Path(directory)
    if is_export(directory):
        return load_export(directory, device)
    if is_hf_checkpoint(directory):  # a Hugging Face directory, or Baton's export in that format
        source = open_weights(directory)
        with torch.device(device):
            model = LM.from_config(source.model_config)
        load_weights(model, source)
        return model
    with torch.device(device):
        model = LM.from_config(read_train_state(directory)["model_config"])
    load_model_weights(directory, model)
    return model


def load_model_weights(directory: Path, model: torch.nn.Module) -> None:
    """Fill a whole, unsharded model with the weights of a training checkpoint of any engine."""
    directory = Path(directory)
    with refusing_bad_files(directory):
        if dcp.is_dcp(directory):  # one process or FSDP at any world size: DCP reshards on load
            dcp.load_model_weights(directory, model)
        elif deepspeed.is_deepspeed(directory):  # gather the fp32 partitions of every rank
            model.load_state_dict(deepspeed.consolidated_state_dict(directory))
        else:
            raise CheckpointError(f"{directory}: holds neither torch.distributed.checkpoint nor DeepSpeed files")
