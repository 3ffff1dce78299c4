"""Checkpoints: torch.distributed.checkpoint for model and optimizer, JSON for everything else.

Layout of run_dir/checkpoints/step_000100/: the engine's model + optimizer state (FSDP and one process:
DCP shards and .metadata, sharded the way the engine holds them, so a resume at another world size
reshards on load; DeepSpeed: its own ZeRO checkpoint, train state as client state), train_state.json
(step, tokens seen, data loader state, the model config it belongs to) and rng_rank{r}.json. A save
goes to a hidden temporary directory that is renamed only when every rank has finished, so a killed save
never looks complete; resume=auto takes the newest complete one. The newest `keep` are kept.
"""
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

TRAIN_STATE = "train_state.json"


class CheckpointError(RuntimeError):
    pass


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Checkpointer:
    def __init__(self, root: Path, keep: int):
        self.root = Path(root)
        self.keep = keep

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
        """Write the engine's model and optimizer, this rank's RNG and the train state as step `step`."""
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f".step_{step:06d}.tmp"
        train_state = dict(train_state, step=step)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
            tmp.mkdir(parents=True)
        _barrier()
        engine.save_state(tmp, train_state)
        (tmp / f"rng_rank{_rank()}.json").write_text(json.dumps(_rng_state()))
        _barrier()
        if _rank() == 0:
            (tmp / TRAIN_STATE).write_text(json.dumps(train_state, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old)
        _barrier()
        return final

    def load(self, path: Path, engine, model_config: dict) -> dict:
        """Restore the engine's model and optimizer and this rank's RNG from `path`; return its train state."""
        path = Path(path)
        state_file = path / TRAIN_STATE
        if not state_file.is_file():
            raise CheckpointError(f"{path}: not a complete checkpoint (no {TRAIN_STATE})")
        train_state = json.loads(state_file.read_text())
        saved_config = train_state.get("model_config", {})
        differing = sorted(k for k in set(saved_config) | set(model_config) if saved_config.get(k) != model_config.get(k))
        if differing:
            shown = ", ".join(f"{k}: {saved_config.get(k)!r} vs {model_config.get(k)!r}" for k in differing[:4])
            raise CheckpointError(f"{path}: checkpoint is from another model ({shown})")
        engine.load_state(path, train_state)
        rng_file = path / f"rng_rank{_rank()}.json"
        if rng_file.is_file():
            _set_rng_state(json.loads(rng_file.read_text()))
        return train_state


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
