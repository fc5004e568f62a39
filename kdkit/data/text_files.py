"""Local JSON-lines, JSON, CSV, text and Parquet files loaded with `datasets`, refused in one line naming the file
and the row when they are malformed.

Why: `datasets` reports a broken line as a long generation error that names neither the file nor the line, and a
line that merely lacks a field is not reported at all (its value becomes null, and code far away fails on it).
Loading stays `datasets`' (fast, cached); only when something is wrong is the file read again, line by line, to
name the first bad line (JSON lines, text) or row (CSV, Parquet, a JSON array).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataFileError


def load_data_file(path: Path, builder: str, split: str, cache_dir: Path, text_fields: tuple[str, ...] = ()):
    """`datasets.load_dataset(builder, data_files={split: path})`; a file it cannot read, and a row whose value of
    one of `text_fields` (required text columns) is missing or not text, raise `DataFileError` naming the file
    and the row."""
    import datasets
    from datasets.utils import logging as ds_logging

    path = Path(path)
    shown = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # a local file's one-off cache build: no bars before a one-line refusal
    try:
        ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, cache_dir=str(cache_dir))
    except Exception as e:  # datasets and pyarrow raise many kinds for a malformed file
        where = _first_bad_line(path, builder, text_fields)
        raise DataFileError(where or f"{path}: cannot be read as {builder} ({_cause(e)})") from None
    finally:
        if shown:
            ds_logging.enable_progress_bar()
    for field in text_fields:
        if field not in ds.column_names:  # no row has it
            raise DataFileError(_first_bad_line(path, builder, text_fields) or
                                f"{path}: no '{field}' column (columns: {', '.join(ds.column_names)})")
    require_text(ds, text_fields, path, builder)
    return ds


def require_text(ds, fields: tuple[str, ...], path: Path, builder: str) -> None:
    """Every value of the columns `fields` is a string, else `DataFileError` naming the file and the first bad row."""
    from datasets import Value

    for field in fields:
        feature = ds.features.get(field)
        if isinstance(feature, Value) and feature.dtype in ("string", "large_string") and \
                ds.data.column(field).null_count == 0:
            continue
        where = _first_bad_line(path, builder, fields)
        if where is None:  # not a line-based file: the row number in the table
            row, value = next((i, v) for i, v in enumerate(ds[field]) if not isinstance(v, str))
            where = f"{path}, row {row + 1}: {_not_text(field, value)}"
        raise DataFileError(where)


def _first_bad_line(path: Path, builder: str, fields: tuple[str, ...]) -> str | None:
    """'<file>, line N: what is wrong' for the first bad line of a JSON-lines or text file; None when the file is
    not line-based or no line is at fault."""
    if builder == "text":
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return f"{path}, line {n}: not UTF-8 text ({e.reason} at byte {e.start})"
        return None
    if builder != "json":
        return None
    try:
        whole = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        whole = None
    if isinstance(whole, list):  # a JSON array of records: rows, not lines
        for i, record in enumerate(whole, 1):
            what = _bad_record(record, fields)
            if what:
                return f"{path}, row {i}: {what}"
        return None
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{path}, line {n}: not UTF-8 text ({e.reason} at byte {e.start})"
            if not text.strip():
                continue
            try:
                record = json.loads(text.rstrip("\r\n"))
            except ValueError as e:
                return f"{path}, line {n}: not valid JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})"
            what = _bad_record(record, fields)
            if what:
                return f"{path}, line {n}: {what}"
    return None


def _bad_record(record, fields: tuple[str, ...]) -> str | None:
    if not isinstance(record, dict):
        return f"not a JSON object (a {type(record).__name__})"
    for field in fields:
        if field not in record:
            return f"no '{field}' field (each record needs {', '.join(repr(f) for f in fields)})"
        if not isinstance(record[field], str):
            return _not_text(field, record[field])
    return None


def _not_text(field: str, value) -> str:
    shown = json.dumps(value)[:40] if value is not None else "null"
    return f"'{field}' is {shown}, not text"


def _cause(e: BaseException) -> str:
    """The innermost message of a chained exception, on one line (datasets wraps pyarrow's errors)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
