"""Strict CSV/TSV reading for catalogs: every data record is checked, and every problem names its line.

pandas' ``read_csv`` pads a short row with NaN, shifts a long one into the index (losing its
first field, e.g. the image path), and reports a wrong encoding without a row. This reader
(Python's :mod:`csv` with ``strict=True``) keeps one :class:`CsvRecord` per data record with the
line it starts on, as a text editor numbers lines (the header is line 1; a quoted field holding
line breaks spans several lines; blank lines are skipped but counted), and marks as an error:

- a ragged record: more or fewer fields than the header;
- a cell that is not valid UTF-8 (read with ``surrogateescape``, so the other rows still parse);
- a record the CSV grammar rejects (a stray quote, a quoted field open at the end of the file,
  a field longer than :data:`csv.field_size_limit`).

Problems of the file as a whole (it cannot be read, is empty, its header is not UTF-8 or names
a column twice) raise :class:`~prodclass.catalog.CatalogError` naming the file.
Format: RFC 4180 (https://www.rfc-editor.org/rfc/rfc4180) with ``"`` quoting, any line ending
(``\\n``, ``\\r\\n``, ``\\r``), an optional UTF-8 byte-order mark, ``.gz`` compression by suffix.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import CatalogError

_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, after surrogateescape


@dataclass(frozen=True)
class CsvRecord:
    """One data record of a CSV file.

    Attributes:
        line: 1-based line of the file where the record starts (the header is line 1).
        cells: one string per header column (empty tuple when ``error`` is set).
        error: why the record cannot be used, naming its line and, where there is one, the
            column (``"line 4, column 'name': not valid UTF-8 (byte 0xe9)"``); None if fine.
    """

    line: int
    cells: tuple[str, ...]
    error: str | None = None


def read_csv_records(path: str | Path, sep: str = ",") -> tuple[list[str], list[CsvRecord]]:
    """The header and every data record of a CSV (``sep=","``) or TSV (``sep="\\t"``) file.

    Args:
        path: the file (``.gz``: gzip-compressed).
        sep: the field delimiter.

    Returns:
        ``(columns, records)``: the header's column names (an empty name becomes ``Unnamed: i``
        with ``i`` its 0-based position, as pandas names it) and one :class:`CsvRecord` per
        non-blank data record, in file order.

    Raises:
        CatalogError: the file cannot be read (missing, a folder, no permission, bad gzip
            data), has no header row, or its header is not valid UTF-8, breaks the CSV grammar or
            names a column twice (the message names the file).
    """
    path = Path(path)
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
    records = _records(reader)
    header = next(records, None)
    if header is None:
        raise CatalogError(f"{path}: empty file (no header row)")
    if header.error:
        raise CatalogError(f"{path}: {header.error} (the header row)")
    columns = [c if c.strip() else f"Unnamed: {i}" for i, c in enumerate(header.cells)]
    bad = _ESCAPED.search("".join(columns))
    if bad:
        raise CatalogError(f"{path}: line {header.line}: the header is not valid UTF-8 "
                           f"(byte 0x{ord(bad.group()) - 0xDC00:02x}); save the file as UTF-8")
    seen: dict[str, int] = {}
    for i, c in enumerate(columns):
        if c in seen:
            raise CatalogError(f"{path}: line {header.line}: the header names column {c!r} twice "
                               f"(fields {seen[c] + 1} and {i + 1})")
        seen[c] = i
    return columns, [_checked(r, columns) for r in records]


def _read_text(path: Path) -> str:
    """The file's text: UTF-8 (a leading byte-order mark dropped), invalid bytes kept as lone surrogates."""
    try:
        data = path.read_bytes()
        if path.suffix.lower() == ".gz":
            data = gzip.decompress(data)
    except FileNotFoundError:
        raise CatalogError(f"{path}: catalog table does not exist") from None
    except IsADirectoryError:
        raise CatalogError(f"{path}: is a folder, not a catalog table") from None
    except OSError as e:  # PermissionError, I/O errors, gzip.BadGzipFile
        raise CatalogError(f"{path}: cannot read ({e.strerror or e})") from None
    except (EOFError, zlib.error) as e:
        raise CatalogError(f"{path}: cannot read: damaged gzip data ({e})") from None
    return data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")


def _records(reader) -> Iterator[CsvRecord]:
    """Non-blank records with their first line; a record the grammar rejects comes as an error."""
    last = 0  # reader.line_num after the previous record: the next one starts on last + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield CsvRecord(last + 1, (), f"line {last + 1}: malformed CSV ({e})")
            if reader.line_num == last:  # nothing consumed: stop rather than loop
                return
            last = reader.line_num
            continue
        start, last = last + 1, reader.line_num
        if cells:
            yield CsvRecord(start, tuple(cells))


def _checked(record: CsvRecord, columns: list[str]) -> CsvRecord:
    """``record`` with ``error`` set if it is ragged or holds bytes that are not UTF-8."""
    if record.error:
        return record
    n, where = len(record.cells), f"line {record.line}"
    if n > len(columns):
        return CsvRecord(record.line, (), f"{where}: {n} fields but the header has {len(columns)} columns "
                                          f"(field {len(columns) + 1} has no column; a separator too many?)")
    if n < len(columns):
        return CsvRecord(record.line, (), f"{where}, column {columns[n]!r}: missing; {n} fields but the "
                                          f"header has {len(columns)} columns")
    for col, cell in zip(columns, record.cells, strict=True):
        bad = _ESCAPED.search(cell)
        if bad:
            return CsvRecord(record.line, (), f"{where}, column {col!r}: not valid UTF-8 "
                                              f"(byte 0x{ord(bad.group()) - 0xDC00:02x}); save the file as UTF-8")
    return record


def path_problem(value: str) -> str | None:
    """Why a catalog cell cannot be an image path (empty, a NUL character), or None."""
    if not value.strip():
        return "empty image path"
    if "\x00" in value:
        return "image path holds a NUL character"
    return None
