"""Loading a checkpoint never runs code from it.

A checkpoint directory is input from whoever wrote it. Two places in the libraries we use would unpickle
it freely: torch.distributed.checkpoint reads `.metadata` with plain `pickle.load` and non-tensor entries
(optimizer hyper-parameters) with `torch.load(weights_only=False)`; DeepSpeed reads its `*.pt` files with
`torch.load(weights_only=False)`. Here `.metadata` is read by an unpickler that admits only DCP's own
metadata classes, and every torch.load inside `safe_loading()` is forced to weights_only (tensors,
containers and numbers) plus an explicit allowlist. Whatever else a file names is refused with a
CheckpointError (one line, exit 2): no payload runs.
"""
import contextlib
import os
import pathlib
import pickle
from collections.abc import Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

from configs.errors import CheckpointError

# Every class a DCP .metadata file of ours refers to (read off real files: model + optimizer).
_DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): pathlib.PosixPath,  # StorageMeta.checkpoint_id: a path, constructed inertly
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_METADATA_CLASSES:
            return _DCP_METADATA_CLASSES[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by the restricted unpickler."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing (not a torch.distributed.checkpoint directory)") from None
        except Exception as err:
            raise CheckpointError(f"{path}: not a valid checkpoint metadata file ({type(err).__name__}: {err})") from None
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def checked_reader(path) -> SafeFileSystemReader:
    """A reader for the DCP checkpoint at `path` whose metadata is already known to be safe and sound: a bad
    file fails here with one CheckpointError, not inside DCP (which logs each failure with a traceback)."""
    reader = SafeFileSystemReader(str(path))
    reader.read_metadata()
    return reader


@contextlib.contextmanager
def safe_loading(allowed: list | tuple = ()) -> Iterator[None]:
    """Every torch.load in this block loads weights only (plus the `allowed` globals), whatever its caller
    asks for; a file that needs anything else raises instead of running it."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def is_refused_pickle(err: BaseException) -> bool:
    """Whether an exception (possibly wrapped by DCP or DeepSpeed) comes from refusing a file's content."""
    text = f"{type(err).__name__}: {err}"
    return isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text or "UnpicklingError" in text
