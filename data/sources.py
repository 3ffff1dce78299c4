"""Document streams from the sources `python -m data.prepare` reads, in a deterministic order.

text: a directory (all files below it), a glob or a file; each file is one document.
jsonl / json (a list of objects) / parquet: one document per record, its text in a configurable field.
hf: a Hugging Face dataset by name or local path (load_dataset), or a save_to_disk directory, also streamed.
stdlib: the embedded default corpus (data/stdlib.py).
Bad input raises one error naming the file (and line) and the problem.
"""
import glob
import hashlib
import json
from pathlib import Path
from typing import Iterator, Optional

from data.stdlib import stdlib_documents, stdlib_files

FORMATS = ("auto", "text", "jsonl", "json", "parquet", "hf", "stdlib")
RECORD_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def list_files(source: str) -> list[Path]:
    """A file, every non-hidden file below a directory, or a glob's matches; sorted; [] if nothing."""
    path = Path(source)
    if is_glob(source):
        return sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    if path.is_dir():
        return sorted(p for p in path.rglob("*")
                      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return [path] if path.is_file() else []


def is_saved_dataset(path: Path) -> bool:
    """A directory written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def resolve_format(source: str, format: str) -> str:
    """auto: the records format all files share by suffix, text otherwise; an HF dataset if no local file."""
    if format != "auto":
        return format
    path = Path(source)
    if is_saved_dataset(path):
        return "hf"
    files = list_files(source)
    if not files:
        if is_glob(source) or path.exists() or source.startswith((".", "/", "~")):
            raise FileNotFoundError(f"{source}: no files found")
        return "hf"
    formats = {RECORD_SUFFIXES.get(f.suffix, "text") for f in files}
    return formats.pop() if len(formats) == 1 else "text"


class DocumentSource:
    """Re-iterable stream of document texts; `total` is the document count when it is known cheaply."""

    def __init__(self, source: str, format: str = "auto", field: str = "text", hf_config: Optional[str] = None,
                 hf_split: str = "train", streaming: bool = False):
        if format not in FORMATS:
            raise ValueError(f"format: '{format}' is not one of {', '.join(FORMATS)}")
        self.source, self.field = source, field
        self.hf_config, self.hf_split, self.streaming = hf_config, hf_split, streaming
        self.format = resolve_format(source, format)
        self.total = None
        if self.format == "stdlib":
            self.total = len(stdlib_files())
        elif self.format == "hf":
            self.dataset = load_hf(source, hf_config, hf_split, streaming)
            if not streaming:
                self.total = len(self.dataset)
        else:
            self.files = list_files(source)
            if not self.files:
                raise FileNotFoundError(f"{source}: no files found")
            if self.format == "text":
                self.total = len(self.files)

    def fingerprint(self) -> Optional[str]:
        """Names, sizes and modification times of the source files (None for a Hugging Face dataset):
        an interrupted prepare only continues on the source it started on."""
        if self.format == "hf":
            return None
        files = stdlib_files() if self.format == "stdlib" else self.files
        stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        return hashlib.sha256(json.dumps(stats).encode()).hexdigest()

    def __iter__(self) -> Iterator[str]:
        if self.format == "stdlib":
            return stdlib_documents()
        if self.format == "hf":
            return self.hf_documents()
        read = {"text": read_text, "jsonl": self.jsonl_documents, "json": self.json_documents,
                "parquet": self.parquet_documents}[self.format]
        return (doc for path in self.files for doc in read(path))

    def check_text(self, value, where: str) -> str:
        if value is None:
            raise ValueError(f"{where}: missing field '{self.field}'")
        if not isinstance(value, str):
            raise ValueError(f"{where}: field '{self.field}' is a {type(value).__name__}, expected a string")
        return value

    def jsonl_documents(self, path: Path) -> Iterator[str]:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({err})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
                yield self.check_text(record.get(self.field), f"{path}:{lineno}")

    def json_documents(self, path: Path) -> Iterator[str]:
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of objects, got {type(records).__name__}")
        for i, record in enumerate(records):
            value = record.get(self.field) if isinstance(record, dict) else None
            yield self.check_text(value, f"{path}: record {i}")

    def parquet_documents(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as err:
            raise ValueError(f"{path}: unreadable parquet file ({err})") from None
        if self.field not in table.schema_arrow.names:
            raise ValueError(f"{path}: missing field '{self.field}' (columns: {', '.join(table.schema_arrow.names)})")
        row = 0
        for batch in table.iter_batches(columns=[self.field]):
            for value in batch.column(0).to_pylist():
                yield self.check_text(value, f"{path}: row {row}")
                row += 1

    def hf_documents(self) -> Iterator[str]:
        for i, record in enumerate(self.dataset):
            if self.field not in record:
                raise ValueError(f"{self.source}: missing field '{self.field}' (columns: {', '.join(record)})")
            yield self.check_text(record[self.field], f"{self.source}: record {i}")


def read_text(path: Path) -> Iterator[str]:
    try:
        yield path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None


def load_hf(source: str, config: Optional[str], split: str, streaming: bool):
    import datasets

    path = Path(source)
    try:
        if is_saved_dataset(path):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[split]
            return dataset.to_iterable_dataset() if streaming else dataset
        return datasets.load_dataset(source, name=config, split=split, streaming=streaming)
    except Exception as err:  # datasets raises many types (DatasetNotFoundError, FileNotFoundError, KeyError...)
        where = "" if path.exists() else "no such file or directory, and "
        raise ValueError(f"{source}: {where}cannot load it as a Hugging Face dataset "
                         f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
