"""Training checkpoints: the engine's model and optimizer (checkpoints/dcp.py or checkpoints/deepspeed.py),
JSON for everything else.

Layout of run_dir/checkpoints/step_000100/: the engine's model + optimizer state (FSDP and one process:
DCP shards and .metadata, sharded the way the engine holds them, so a resume at another world size
reshards on load; DeepSpeed: its own ZeRO checkpoint, train state as client state), train_state.json
(step, tokens seen, data loader state, the model config it belongs to) and rng_rank{r}.json.

Crash safety: a save goes to a hidden `.step_N.tmp` directory that rank 0 renames to `step_N` only once
every rank's shards and the metadata are written; train_state.json, written last inside it, marks a
complete checkpoint. Old checkpoints are first renamed to a hidden name and then deleted, so a kill at
any moment (during the write, the rename or the keep-k cleanup) leaves the newest complete checkpoint
whole, and resume=auto takes it.

Asynchronous saves (DCP async_save on its own gloo group): `save` copies the state to memory and
returns; the files are written in a background thread while training goes on. `poll` (every step)
publishes a finished save, and the next save, a signal-triggered one, or `wait` (at exit) first finishes
the one in flight. DeepSpeed writes its own files synchronously.

Loading never unpickles: see checkpoints/safe_load.py.
"""
import contextlib
import json
import os
import random
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from omegaconf import DictConfig, OmegaConf

from checkpoints.safe_load import is_refused_pickle
from configs.errors import CheckpointError

TRAIN_STATE = "train_state.json"
RUN_CONFIG = "config.yaml"  # the run's resolved config: run_dir/config.yaml, or inside an export


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@dataclass
class _PendingSave:
    step: int
    tmp: Path
    final: Path
    train_state: dict
    future: Future | None  # None: written synchronously
    started: float


class Checkpointer:
    def __init__(self, root: Path, keep: int, async_save: bool = True):
        self.root = Path(root)
        self.keep = keep
        self.async_save = async_save
        self._pending: _PendingSave | None = None
        self._save_group = None  # a gloo group of its own, so background writes never race the step's collectives
        self._blocking_s = 0.0

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.glob("step_*") if (p / TRAIN_STATE).is_file()]
        return sorted(done, key=lambda p: int(p.name.split("_")[1]))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, engine, train_state: dict) -> Path:
        """Start writing the engine's model and optimizer, this rank's RNG and the train state as step `step`;
        returns the path the checkpoint will have once complete."""
        started = time.perf_counter()
        self.wait()
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f".step_{step:06d}.tmp"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
            tmp.mkdir(parents=True)
        _barrier()
        (tmp / f"rng_rank{_rank()}.json").write_text(json.dumps(_rng_state()))
        future = engine.save_state(tmp, dict(train_state, step=step), self.async_save, self._group())
        self._pending = _PendingSave(step, tmp, final, dict(train_state, step=step), future, started)
        self._blocking_s = time.perf_counter() - started
        return final

    def poll(self) -> dict:
        """Publish the save in flight if its files are written (called every step; never blocks). Returns
        what `wait` returns when it published one, else {}."""
        if self._pending is not None and (self._pending.future is None or self._pending.future.done()):
            return self.wait()
        return {}

    def wait(self) -> dict:
        """Finish the save in flight (if any) and publish it. Returns {} or a metrics record of the save:
        its step, the seconds the step loop spent in `save` and the seconds until it was published."""
        pending, self._pending = self._pending, None
        if pending is None:
            return {}
        if pending.future is not None:
            pending.future.result()  # a failed write raises here, on the rank it failed on
        else:
            _barrier()  # synchronous engines: every rank's files are written
        # The coordinator (rank 0) writes .metadata only after every rank reported its shards written, so
        # once its save is done the checkpoint is whole and rank 0 can publish it alone.
        if _rank() == 0:
            (pending.tmp / TRAIN_STATE).write_text(json.dumps(pending.train_state, indent=1))
            if pending.final.exists():
                _remove(pending.final)
            os.replace(pending.tmp, pending.final)
            for old in self.complete()[: -self.keep]:
                _remove(old)
        return {"step": pending.step, "checkpoint_blocking_s": self._blocking_s,
                "checkpoint_total_s": time.perf_counter() - pending.started}

    def _group(self):
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if self._save_group is None:
            self._save_group = dist.new_group(backend="gloo")
        return self._save_group

    def load(self, path: Path, engine, model_config: dict) -> dict:
        """Restore the engine's model and optimizer and this rank's RNG from `path`; return its train state."""
        path = Path(path)
        train_state = read_train_state(path)
        saved_config = train_state.get("model_config", {})
        differing = sorted(k for k in set(saved_config) | set(model_config) if saved_config.get(k) != model_config.get(k))
        if differing:
            shown = ", ".join(f"{k}: {saved_config.get(k)!r} vs {model_config.get(k)!r}" for k in differing[:4])
            raise CheckpointError(f"{path}: checkpoint is from another model ({shown})")
        with refusing_bad_files(path):
            engine.load_state(path, train_state)
        rng_file = path / f"rng_rank{_rank()}.json"
        if rng_file.is_file():
            _set_rng_state(_read_json(rng_file))
        return train_state


def _remove(directory: Path) -> None:
    """Delete a checkpoint so that no kill leaves a half-deleted one looking complete: rename it away first."""
    doomed = directory.with_name(f".{directory.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(directory, doomed)
    shutil.rmtree(doomed)


@contextlib.contextmanager
def refusing_bad_files(path: Path):
    """Turn what a tampered or foreign checkpoint file makes the loaders raise into one CheckpointError."""
    try:
        yield
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
        inner = _innermost(err)
        if isinstance(inner, CheckpointError):  # ours, raised inside DCP's collective wrapper
            raise inner from None
        cause = inner
        while cause is not None and not is_refused_pickle(cause):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise CheckpointError(f"{path}: refused to load a file that is not plain tensors and numbers "
                                  f"({_first_line(cause)})") from None
        raise CheckpointError(f"{path}: cannot load ({_first_line(inner)})") from None  # truncated, foreign


def _innermost(err: BaseException) -> BaseException:
    """DCP wraps each rank's exception, as (exception, stack), in a CheckpointException."""
    if isinstance(err, CheckpointException) and err.failures:
        failure = next(iter(err.failures.values()))
        return failure[0] if isinstance(failure, tuple) else failure
    return err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a valid JSON file ({type(err).__name__})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def read_train_state(path: Path) -> dict:
    """The train state of a complete training checkpoint (step, loader state, model config)."""
    state_file = Path(path) / TRAIN_STATE
    if not state_file.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {TRAIN_STATE})")
    state = _read_json(state_file)
    if not isinstance(state.get("step"), int) or not isinstance(state.get("model_config"), dict):
        raise CheckpointError(f"{state_file}: no step or model config")
    return state


def run_config(path: Path) -> DictConfig:
    """The full config of the run a checkpoint belongs to: run_dir/config.yaml for a training checkpoint
    (run_dir/checkpoints/step_N), or the config.yaml an export carries."""
    path = Path(path)
    for candidate in (path / RUN_CONFIG, path.parent.parent / RUN_CONFIG):
        if candidate.is_file():
            try:
                config = OmegaConf.load(candidate)
            except Exception as err:
                raise CheckpointError(f"{candidate}: unreadable run config ({type(err).__name__})") from None
            if not isinstance(config, DictConfig) or "model" not in config:
                raise CheckpointError(f"{candidate}: not a run config (no model section)")
            return config
    raise CheckpointError(f"{path}: no {RUN_CONFIG} beside it or in its run directory")


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"malformed RNG state in checkpoint ({type(err).__name__}: {err})") from None
