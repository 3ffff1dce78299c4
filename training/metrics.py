"""Where metrics go: metrics.jsonl (the record tests and plots read), wandb, and the progress bar.

Only the main rank logs. wandb is optional infrastructure: if it cannot start (no network in online
mode, a broken install) the run goes on with metrics.jsonl alone and says so once.
"""
import json
import os
import secrets
import sys
from pathlib import Path

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
        if not self.enabled:
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
