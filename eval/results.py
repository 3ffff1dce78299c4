"""What a task returns, and how results are shown: the flat figures, the summary table, the JSON, the PNGs."""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class TaskResult:
    name: str
    settings: dict          # every setting the task ran with, nulls resolved
    figures: dict           # flat numbers, named for metrics.jsonl and wandb (held_out_loss, mqar_accuracy, ...)
    details: dict = field(default_factory=dict)  # curves and grids, for the JSON
    plot: Optional[Callable[[Path], Path]] = None  # draws the task's PNG into a directory, returns its path

    def __post_init__(self):
        self.figures = {k: v for k, v in self.figures.items() if v is not None}  # e.g. no length beyond training

    def as_dict(self) -> dict:
        return {"settings": self.settings, "figures": self.figures, **self.details}


def flat_figures(results: list[TaskResult]) -> dict:
    return {k: v for r in results for k, v in r.figures.items()}


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(results: list[TaskResult], out_dir: Path, header: dict, name: str = "eval.json") -> list[Path]:
    """out_dir/eval.json (header, every task's settings, figures and details, and the flat figures) and
    every task's PNG; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {**header, **flat_figures(results), "tasks": {r.name: r.as_dict() for r in results}}
    path = out_dir / name
    tmp = path.with_name(f".{name}.tmp")
    tmp.write_text(json.dumps(document, indent=1))
    tmp.replace(path)
    return [path] + [r.plot(out_dir) for r in results if r.plot is not None]


def summary_table(results: list[TaskResult]) -> str:
    """One line per figure: task, figure, value."""
    rows = [(r.name, k, f"{v:.4f}" if isinstance(v, float) else str(v)) for r in results for k, v in r.figures.items()]
    widths = [max(len(row[i]) for row in rows + [("task", "figure", "value")]) for i in range(3)]
    lines = [("task", "figure", "value"), tuple("-" * w for w in widths), *rows]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
