"""The embedded default corpus: the running Python's standard library source (~30 MB on every machine).

Each .py file is one document, in sorted path order. Third-party packages (site-packages) and the few
test files that are deliberately not UTF-8 are left out.
"""
import os
import sysconfig
from pathlib import Path
from typing import Iterator

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def read_utf8(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def stdlib_files() -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(stdlib_root()):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        files.extend(Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return [f for f in files if read_utf8(f) is not None]


def stdlib_documents() -> Iterator[str]:
    return (read_utf8(path) for path in stdlib_files())
