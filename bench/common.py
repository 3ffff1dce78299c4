"""What the benchmarks share: the results folder, the versions a result is stamped with, writing it, and
printing a table.

Benchmarks are modules run from the repository root (`python -m bench.kernels`,
`torchrun --nproc_per_node=4 -m bench.sequence_parallel`), so the project's packages import without any
path setup.
"""
import datetime
import json
import platform
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def versions() -> dict:
    import triton

    found = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__)
    try:
        import fla
        found["fla"] = fla.__version__
    except ImportError:
        pass
    return found


def write_results(name: str, report: dict, directory: Path = RESULTS_DIR) -> Path:
    """`report`, stamped with the date and the versions, as directory/<name>_<YYYYmmdd_HHMMSS>.json."""
    now = datetime.datetime.now()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}_{now:%Y%m%d_%H%M%S}.json"
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
