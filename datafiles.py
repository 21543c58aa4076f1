"""Data files: the records of a JSONL(.gz), JSON or Parquet file, and the splits of a dataset directory (a Hub
snapshot), each record located for error messages. What the records mean is data.py's business.

    records(file) ──► (where, dict) ...        where = "file:line", "file:line: record [i]" or "file: row [i]"
    splits(dir) ──► {split: [files]}; choose_split(dir, name | 'auto', role) ──► the split to read

Bad input raises DataError naming the file and the line or row; nothing is skipped silently.
"""
import gzip
import json
import re
import sys
import zlib
from pathlib import Path
from typing import Iterable

import inputs


class DataError(ValueError):
    """Bad input; the message names the file, the line (1-based) or row (0-based, as datasets indexes it), and the
    field."""


SUFFIXES = (".parquet", ".jsonl.gz", ".jsonl", ".json")

# ----------------------------------------------------------------------------------------------------------------------
# JSON: one object per line (.jsonl, .jsonl.gz), or one array (.json)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        field = ""  # name the field when the line still parses with the bad bytes escaped
        try:
            rec = json.loads(raw.decode("utf-8", "surrogateescape"))
            escaped = {k: json.dumps(v, ensure_ascii=False) for k, v in rec.items()}
            bad = [k for k, v in escaped.items() if any(0xDC80 <= ord(c) <= 0xDCFF for c in v)]
            field = f", field {bad[0]!r}" if bad else ""
        except (ValueError, AttributeError):
            pass
        raise DataError(f"{where}: invalid UTF-8 at byte {e.start}{field}") from None


def _loads(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:  # json recurses once per nesting level
        raise DataError(f"{where}: JSON nested too deeply (deeper than {sys.getrecursionlimit()} levels)") from None


def _json_lines(path: Path, raw: bytes) -> Iterable:
    """(where, record) of a .jsonl file; blank lines are errors, not silently skipped."""
    for line_no, line in enumerate(raw.splitlines(), 1):
        where = f"{path}:{line_no}"
        if not line.strip():
            raise DataError(f"{where}: line {line_no} is blank (JSONL holds one JSON object per line: delete it)")
        yield where, _loads(_decode(line, where), where)


def _json_array(path: Path, raw: bytes) -> Iterable:
    """(where, record) of a .json file holding one array, each record located at the line where it starts."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw.count(b"\n", 0, e.start) + 1
        _decode(raw.splitlines()[line_no - 1], f"{path}:{line_no}")  # raises, naming the field if it can
    try:
        records = json.loads(text) if text.strip() else []  # an empty file: data.py says so
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{path}:1: JSON nested too deeply (deeper than {sys.getrecursionlimit()} levels)") from None
    if not isinstance(records, list):
        raise DataError(f"{path}:1: expected a JSON array of records, got {type(records).__name__}")
    i, line_no, decoder, separator = text.find("[") + 1, 1, json.JSONDecoder(), re.compile(r"[\s,]*")
    for index, rec in enumerate(records):  # valid JSON: step over each record again to learn the line it starts on
        start = separator.match(text, i).end()
        end = decoder.raw_decode(text, start)[1]
        line_no += text.count("\n", i, start)
        yield f"{path}:{line_no}: record [{index}]", rec  # the index too: a one-line array has every record on line 1
        line_no, i = line_no + text.count("\n", start, end), end


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}:1: cannot read ({e.strerror})") from None


def _read_gzip(path: Path) -> bytes:
    """The decompressed bytes of a .gz file; a corrupted or truncated stream is a DataError naming the line it
    reached (the lines before it decompressed fine)."""
    out = bytearray()
    try:
        with gzip.open(path) as f:
            while chunk := f.read(1 << 16):  # small reads: the error names a line near the damage
                out += chunk
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile) and e.errno is not None:
            raise DataError(f"{path}:1: cannot read ({e.strerror})") from None
        line = out.count(b"\n") + 1
        raise DataError(f"{path}:{line}: corrupted gzip data after {len(out)} decompressed bytes "
                        f"({type(e).__name__}: {e}); download or compress the file again") from None
    return bytes(out)


# ----------------------------------------------------------------------------------------------------------------------
# Parquet: the Hub's format. Columns become dict keys: strings stay str, TRL's conversational columns
# (list<struct<role, content>>) become lists of {"role", "content"} dicts, nulls None (data.py rejects them by name).

def _parquet_rows(path: Path, columns: Iterable[str]) -> Iterable:
    """(where, record) of a .parquet file, reading only `columns` (those present): other columns, whatever their
    type, are never converted. Rows are numbered from 0, as `datasets` indexes them."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs the optional pyarrow package (pip install pyarrow)") from None
    try:
        f = pq.ParquetFile(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except pyarrow.ArrowException as e:
        raise DataError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())})") from None
    present = [c for c in columns if c in f.schema_arrow.names]
    row = 0
    for group in range(f.num_row_groups):  # a row group at a time: a damaged one is named by its rows
        n = f.metadata.row_group(group).num_rows
        try:
            batch = f.read_row_group(group, columns=present)
        except (pyarrow.ArrowException, OSError) as e:
            raise DataError(f"{path}: row [{row}]: corrupted Parquet data in row group {group} (rows [{row}] to "
                            f"[{row + n - 1}]): {' '.join(str(e).split())}") from None
        for rec in batch.to_pylist():
            yield f"{path}: row [{row}]", rec
            row += 1


def records(path: Path, columns: Iterable[str]) -> Iterable:
    """(where, record) of a .jsonl, .jsonl.gz, .json or .parquet file. `columns`: the fields a Parquet reader needs
    (JSON records are parsed whole anyway)."""
    name = path.name
    if path.exists():  # a FIFO would block, /dev/zero never end: refused before any read (a missing file: below)
        inputs.check_regular(path, DataError)
    if name.endswith(".parquet"):
        return _parquet_rows(path, columns)
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return _json_lines(path, _read_gzip(path) if name.endswith(".gz") else _read(path))
    if name.endswith(".json"):
        return _json_array(path, _read(path))
    raise DataError(f"{path}:1: unknown file type (expected .jsonl, .jsonl.gz, .json or .parquet)")


# ----------------------------------------------------------------------------------------------------------------------
# dataset directories. A Hub snapshot names its files by split, the way `datasets` does:
#   data/train_prefs-00000-of-00001.parquet   split train_prefs ("data/" is the Hub's data folder, not a subset)
#   train-00000-of-00002.parquet, train-00001-of-00002.parquet   split train, two shards read in order
#   train.jsonl, test.jsonl.gz                 splits train, test
#   helpful-base/train.jsonl.gz, harmless-base/test.jsonl.gz   Anthropic/hh-rlhf: subsets (folders), split per subset
#   helpful-base-test.jsonl.gz                 the same with the subset in the name
# A split name is a word (datasets allows letters, digits and _), so the part of a name after its last "-" (the shard
# suffix removed) is the split and what comes before it a subset. A split is every file of that name in every subset,
# read in path order; to read one subset, point at its folder or file.

SHARD = re.compile(r"-\d+-of-\d+$")


def split_of(name: str) -> str:
    """The split of a data file by its name: after the last "-", once extension and shard suffix are removed."""
    stem = name[:-len(next(s for s in SUFFIXES if name.endswith(s)))]
    return SHARD.sub("", stem).rpartition("-")[2]


def splits(directory: Path) -> dict[str, list[Path]]:
    """{split: its files in path order} of every data file under directory (hidden entries such as .cache/ and
    non-data files such as README.md are not data)."""
    found: dict[str, list[Path]] = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_file() and rel.name.endswith(SUFFIXES) and not any(p.startswith(".") for p in rel.parts):
            found.setdefault(split_of(rel.name), []).append(path)
    if not found:
        raise DataError(f"{directory}: no data files ({', '.join(SUFFIXES)}) in this directory")
    return dict(sorted(found.items()))


def listing(found: dict[str, list[Path]]) -> str:
    return ", ".join(f"{s} ({len(f)} file{'s' * (len(f) > 1)})" for s, f in found.items())


def choose_split(directory: Path, name: str, role: str = "train", train: str | None = None, option: str = "--split",
                 required: bool = True) -> str | None:
    """The split `name` of a directory, or for name 'auto' the obvious split of its role:
    train: 'train', else 'train_prefs', else the one split whose name holds 'train';
    eval: the train split's twin ('test_prefs' for 'train_prefs'), else 'test', 'test_prefs', 'validation', 'val',
    'dev', else the one split whose name holds 'test'; not `required`, None if there is none (the caller then holds
    out examples of the train split). No such split, or several candidates, is a DataError listing the splits."""
    found = splits(Path(directory))
    if name != "auto":
        if name not in found:
            raise DataError(f"{directory}: no split {name!r}; the splits are {listing(found)}")
        return name
    word = "train" if role == "train" else "test"
    twin = [train.replace("train", "test")] if train and "train" in train else []
    named = ["train", "train_prefs"] if role == "train" else twin + ["test", "test_prefs", "validation", "val", "dev"]
    for split in named:
        if split in found and split != train:
            return split
    holding = [s for s in found if word in s and s != train]
    if len(holding) == 1:
        return holding[0]
    if holding or required:
        raise DataError(f"{directory}: which {role} split? " + (f"several names hold {word!r}" if holding else
                        f"none is named {' or '.join(named)} or holds {word!r}")
                        + f"; the splits are {listing(found)}; name one with {option}")
    return None
