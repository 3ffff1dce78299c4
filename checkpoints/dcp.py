"""torch.distributed.checkpoint (one process and FSDP2): the model and optimizer state, sharded the way the
engine holds them, so a resume at another world size reshards on load; `.metadata` read safely."""
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from checkpoints.safe_load import checked_reader, safe_loading


def is_dcp(directory: Path) -> bool:
    return (Path(directory) / ".metadata").is_file()


def save(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, asynchronous: bool = False,
         group: dist.ProcessGroup | None = None) -> Future | None:
    """Model and optimizer into `directory`. Asynchronous: the state is copied to memory now and written by
    a background thread (collectives on `group`); returns the future of that write."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if asynchronous:
        return dcp.async_save(state, checkpoint_id=str(directory), process_group=group)
    dcp.save(state, checkpoint_id=str(directory))
    return None


def load(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore model and optimizer in place, resharded to the way they are held now."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with safe_loading():
        dcp.load(state, storage_reader=checked_reader(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_model_weights(directory: Path, model: torch.nn.Module) -> None:
    """Fill a whole, unsharded model with the model part of the checkpoint (saved at any world size)."""
    state = {"model": model.state_dict()}
    with safe_loading():
        dcp.load(state, storage_reader=checked_reader(directory))
    model.load_state_dict(state["model"])
