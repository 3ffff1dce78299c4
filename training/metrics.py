"""Where metrics go: metrics.jsonl (the record tests and plots read), wandb, and the console; and the
per-step figures of throughput: tokens/s, MFU, peak memory, ETA.

Only the main rank logs. wandb is optional infrastructure: if it cannot start (no network in online
mode, a broken install) the run goes on with metrics.jsonl alone and says so once.
"""
import json
import os
import resource
import secrets
import sys
from collections import deque
from pathlib import Path

import torch

from configs.schema import WandbConfig


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after `last_step`: a resumed run redoes those steps and writes them again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class MetricsLogger:
    def __init__(self, run_dir: Path, wandb_cfg: WandbConfig, config: dict, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        if enabled and wandb_cfg.mode != "disabled":
            self.wandb_run = _start_wandb(run_dir, wandb_cfg, config)

    def log(self, record: dict) -> None:
        if not self.enabled or not record:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def summary(self, values: dict) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _start_wandb(run_dir: Path, cfg: WandbConfig, config: dict):
    try:
        import wandb

        return wandb.init(
            mode=cfg.mode, project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name,
            dir=str(run_dir), config=config, resume="allow", id=_wandb_id(run_dir),
            settings=wandb.Settings(init_timeout=60, silent=True),
        )
    except Exception as err:  # wandb must never fail a training run
        print(f"warning: wandb disabled ({type(err).__name__}: {err})", file=sys.stderr)
        return None


def _wandb_id(run_dir: Path) -> str:
    """One wandb run per run directory, so a resumed run continues the same wandb run."""
    id_file = run_dir / "wandb_id"
    if not id_file.exists():
        id_file.write_text(secrets.token_hex(4))
    return id_file.read_text().strip()


# Dense bf16 peak FLOP/s per device, for MFU (vendor figures, no sparsity). Checked in order: the first
# name contained in the device's name wins, so "H100 PCIe" comes before "H100".
PEAK_BF16_FLOPS = (("B200", 2.25e15), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))


def peak_flops(device: torch.device) -> float | None:
    """The device's bf16 peak, or None where MFU means nothing (CPU, an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this rank: allocated device memory on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def process_memory_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (the peak since the last reset_peak_memory) of this process (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak_memory() -> None:
    """Reset this process's VmHWM to its current RSS, so that the next peak measures what follows."""
    Path("/proc/self/clear_refs").write_text("5")


class StepTimer:
    """tokens/s, MFU, peak memory and ETA of each step, from the step's wall time."""

    def __init__(self, flops_per_token: float, device: torch.device, world_size: int, window: int = 20):
        self.flops_per_token = flops_per_token
        self.device = device
        self.peak = peak_flops(device)
        self.world_size = world_size
        self.recent = deque(maxlen=window)

    def step(self, seconds: float, tokens: int, steps_left: int) -> dict:
        self.recent.append(seconds)
        record = {"tokens_per_s": tokens / seconds, "peak_mem_gib": round(peak_memory_gib(self.device), 3),
                  "eta_s": round(steps_left * sum(self.recent) / len(self.recent), 1)}
        if self.peak is not None:
            record["mfu"] = self.flops_per_token * tokens / seconds / (self.peak * self.world_size)
        return record


def console_line(record: dict, max_steps: int) -> str:
    eta = int(record["eta_s"])
    parts = [f"step {record['step']}/{max_steps}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}",
             f"grad {record['grad_norm']:.3f}", f"{record['tokens_per_s']:,.0f} tok/s"]
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    parts += [f"mem {record['peak_mem_gib']:.2f} GiB", f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"]
    return " | ".join(parts)
