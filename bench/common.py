"""What the benchmarks share: the repository root, the results folder, the versions a result is stamped with,
writing it, and printing a table.

Benchmarks are modules run from the repository root (`python -m bench.kernels`,
`torchrun --nproc_per_node=4 -m bench.sequence_parallel`), so the project's packages import without any
path setup.
"""
import datetime
import importlib.metadata
import json
import platform
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]  # for what a benchmark reads or runs there: configs/, train.py
RESULTS_DIR = REPO / "bench" / "results"


def package_version(*names: str) -> str | None:
    """The installed version of the first of these distributions found, None when none is: looked up, not
    imported, so a package that fails to import is reported by what imports it, not here."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    return dict(python=platform.python_version(), torch=torch.__version__, triton=package_version("triton"),
                fla=package_version("fla-core", "flash-linear-attention"))


def write_results(name: str, report: dict, directory: Path = RESULTS_DIR, path: Path | None = None) -> Path:
    """`report`, stamped with the date and the versions, as directory/<name>_<YYYYmmdd_HHMMSS>.json, or at
    `path` when the caller names the file (a command's --out)."""
    now = datetime.datetime.now()
    path = path or directory / f"{name}_{now:%Y%m%d_%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(date=now.isoformat(timespec="seconds"), versions=versions(), **report), indent=2))
    print(f"\nresults written to {path}")
    return path


def print_table(title: str, rows: list[dict]) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(c for row in rows for c in row))
    cell = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)
    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(cell(row.get(c, "")).rjust(w) for c, w in zip(columns, widths)))
