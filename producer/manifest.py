"""Reading a manifest: a stream of bytes in, one ``RowOutcome`` per data row out.

The reader streams: it holds one record at a time plus a compact table of the ids seen
so far (for duplicates), never the whole file. Bytes are split into lines on LF only
(as ``open(newline="")`` would), so quoted CSV fields may hold CR or LF, and each line is
decoded as UTF-8 on its own (a BOM at the start is skipped).

``ManifestUnreadable`` means the input is not a manifest at all (empty, no usable header,
binary data at the start, a first JSON line that is not an object); everything after
that is reported per row and never stops the reading.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from array import array
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import BinaryIO, Literal, NamedTuple

from producer.suggest import column_suggestion, unknown_column_warning
from producer.validation import (
    KNOWN_COLUMNS,
    OPTION_PARSERS,
    ROW,
    InvalidField,
    RowDefaults,
    as_text,
    validate_row,
)
from worker.errors import Codes, FieldError, ManifestUnreadable, UsageError
from worker.jobs import JobSpec, safe_id
from worker.storage import split_image_extension

__all__ = [
    "ROW",
    "Format",
    "RowDefaults",
    "RowOutcome",
    "detect_format",
    "parse_set_options",
    "read_manifest",
]

Format = Literal["csv", "jsonl"]

_BOM = codecs.BOM_UTF8
# Binary garbage is looked for in this much of the first line before reading the rest of it.
_START_CHECK_BYTES = 1 << 16
# Single CSV fields may be large (data: URIs): raise the csv module's 128 KiB default.
_CSV_FIELD_LIMIT = 64 << 20


@dataclass(frozen=True, slots=True)
class RowOutcome:
    """What became of one data row: a spec, or the reasons it was refused."""

    index: int  # 0-based position among data rows
    line: int  # 1-based line where the row starts
    row_id: str | None  # the id as read (None when missing)
    spec: JobSpec | None  # None iff errors
    errors: tuple[FieldError, ...]
    raw: Mapping[str, str]  # the row's values as text (for the output manifest of a rejected row)
    # Unknown columns that look like misspelt known ones, each reported on the first row
    # that has it: "unknown column 'backgroud': did you mean 'background'?"
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


# -- format detection ---------------------------------------------------------------------


def _check_start(chunk: bytes, final: bool) -> None:
    """Refuse binary data at the start of the input with a one-line reason."""
    if chunk.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ManifestUnreadable("the manifest is UTF-16 text: save it as UTF-8")
    if b"\x00" in chunk:
        raise ManifestUnreadable(
            "binary data (NUL bytes) at the start: not a UTF-8 CSV or JSON Lines file"
        )
    try:
        codecs.getincrementaldecoder("utf-8")().decode(chunk, final)
    except UnicodeDecodeError as exc:
        raise ManifestUnreadable(
            f"not UTF-8 text (byte 0x{chunk[exc.start]:02x} at offset {exc.start}): binary data?"
        ) from None


def detect_format(name: str, head: bytes, explicit: str | None) -> Format:
    """``--format`` if given, else the extension, else a look at the first bytes."""
    if explicit is not None:
        wanted = explicit.strip().lower()
        if wanted in ("jsonl", "ndjson"):
            return "jsonl"
        if wanted == "csv":
            return "csv"
        raise UsageError(f"--format {explicit!r}: use csv or jsonl")
    suffix = "" if name == "-" else PurePath(name).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    return _sniff(head)


def _sniff(head: bytes) -> Format:
    """Decide by the first non-blank line (later lines may hold a bad row: not our call)."""
    content = head.removeprefix(_BOM).lstrip()
    line, newline, _ = content.partition(b"\n")
    _check_start(line, final=bool(newline))
    text = codecs.getincrementaldecoder("utf-8")().decode(line, bool(newline)).rstrip("\r")
    if not text:
        raise ManifestUnreadable("the manifest is empty")
    if text[0] == "{":
        return "jsonl"
    if text[0] == "[":
        raise ManifestUnreadable("a JSON array: bgswap reads JSON Lines (one object per line)")
    if "," in text and text.isprintable():
        return "csv"
    raise ManifestUnreadable(
        "cannot tell CSV from JSON Lines: name the file .csv or .jsonl, or pass --format"
    )


# -- --set --------------------------------------------------------------------------------


def parse_set_options(items: Sequence[str]) -> dict[str, str]:
    """``--set NAME=VALUE`` items as defaults for option columns (checked here once).

    Local paths in ``background`` and ``style_reference_images`` are made absolute
    against the current directory, where the user typed them (paths in a manifest
    resolve against the manifest's folder instead). Other values are kept as given.
    """
    # Addresses, folders and destinations are checked per row, where the settings are known.
    env = RowDefaults(base_dir=Path.cwd(), allow_private_urls=True, local_roots=(Path("/"),))
    values: dict[str, str] = {}
    for item in items:
        name, equals, value = item.partition("=")
        name = name.strip()
        if not equals:
            raise UsageError(f"--set {item!r}: expected NAME=VALUE")
        parse = OPTION_PARSERS.get(name)
        if parse is None:
            raise UsageError(
                f"--set {name}: not an option column (one of {', '.join(OPTION_PARSERS)})"
            )
        if not value.strip():
            raise UsageError(f"--set {name}: empty value")
        try:
            parsed = parse(value, env)
        except InvalidField as exc:
            raise UsageError(f"--set {name}: {exc.reason}") from None
        if name == "style_reference_images":
            value = "|".join(parsed)
        elif name == "background":
            value = parsed
        values[name] = value.strip()
    return values


# -- lines --------------------------------------------------------------------------------


class _RecordTooLarge(Exception):
    """The record being read has grown past the field cap (an unclosed quote, usually)."""


class _Lines:
    """The input's lines as text, numbered from 1, none longer than ``cap`` bytes.

    Undecodable bytes are replaced and the line number kept in ``bad``; a line over the
    cap is skipped (read through in chunks, never held) and its number kept in
    ``too_long``: the consumer turns both into row errors, and in the first line they mean
    the input is not a manifest. The lines of the record being read are kept (``record``,
    at most ``cap`` bytes in all, else ``_RecordTooLarge``) so that a record found to be
    broken can be given back (``give_back``) and read again from its second line.
    """

    def __init__(self, stream: BinaryIO, cap: int) -> None:
        self._stream = stream
        self.cap = cap
        self.number = 0
        self.bad: list[int] = []
        self.too_long: list[int] = []
        self.record: list[tuple[int, str]] = []
        self.eof = False
        self._bytes = 0
        self._replay: deque[tuple[int, str]] = deque()
        self._read = 0  # lines read from the stream
        self._flagged: dict[int, str] = {}  # line -> "bad" or "too_long", kept for replays

    def _raw_line(self) -> bytes | None:
        """The next line's bytes (None at the end); a line over the cap becomes b''."""
        limit = max(self.cap, _START_CHECK_BYTES) if self._read == 0 else self.cap
        raw = self._stream.readline(limit + 1)
        if not raw:
            return None
        self._read += 1
        if self._read == 1:
            raw = raw.removeprefix(_BOM)
            _check_start(raw[:_START_CHECK_BYTES], final=len(raw) < _START_CHECK_BYTES)
        if len(raw) > limit and not raw.endswith(b"\n"):
            while (more := self._stream.readline(1 << 20)) and not more.endswith(b"\n"):
                pass
            self._flag("too_long", self._read)
            return b""
        return raw

    def _flag(self, kind: str, number: int) -> None:
        (self.bad if kind == "bad" else self.too_long).append(number)
        self._flagged[number] = kind  # flagged again if the line is read again

    def _decode(self, raw: bytes, number: int) -> str:
        try:
            return raw.decode()
        except UnicodeDecodeError:
            self._flag("bad", number)
            return raw.decode(errors="replace")

    def _next(self) -> tuple[int, str] | None:
        if self._replay:
            item = self._replay.popleft()
            if item[0] in self._flagged:
                self._flag(self._flagged[item[0]], item[0])
            return item
        raw = self._raw_line()
        if raw is None:
            return None
        return self._read, self._decode(raw, self._read)

    def next_number(self) -> int:
        """The number of the line the next read will give."""
        return self._replay[0][0] if self._replay else self._read + 1

    def texts(self) -> Iterator[str]:
        """The lines from here on (a new iterator may take over after an exception)."""
        while (item := self._next()) is not None:
            self.number = item[0]
            self.record.append(item)
            self._bytes += len(item[1])
            if self._bytes > self.cap and len(self.record) > 1:
                raise _RecordTooLarge
            yield item[1]
        self.eof = True

    def begin_record(self) -> None:
        self.record = []
        self._bytes = 0

    def give_back(self) -> None:
        """The record was broken: read its lines again, from its second one."""
        self._replay.extendleft(reversed(self.record[1:]))
        self.begin_record()

    def take_bad(self) -> list[int]:
        bad, self.bad = self.bad, []
        return bad

    def take_too_long(self) -> list[int]:
        too_long, self.too_long = self.too_long, []
        return too_long


class _Record(NamedTuple):
    """One data row as read, before validation (``values`` None: nothing to validate)."""

    line: int
    values: Mapping[str, object] | None
    raw: Mapping[str, str]
    errors: tuple[FieldError, ...] = ()
    row_id: str | None = None


def _not_utf8(line: int, bad: list[int]) -> FieldError:
    where = ", ".join(str(n) for n in bad)
    return FieldError(line, ROW, Codes.INVALID_VALUE, f"line {where} is not valid UTF-8")


# -- CSV ----------------------------------------------------------------------------------


def _header_hint(names: list[str]) -> str:
    if names and names[0].startswith("{"):
        return " (this looks like JSON Lines: use --format jsonl)"
    if len(names) == 1 and (";" in names[0] or "\t" in names[0]):
        return " (columns must be separated by commas)"
    return ""


def _check_header(names: list[str]) -> None:
    if "" in names:
        raise ManifestUnreadable(f"header column {names.index('') + 1} has no name")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ManifestUnreadable(f"duplicate column {name!r} in the header")
        seen.add(name)
    for required in ("id", "image"):
        if required not in seen:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ManifestUnreadable(
                f"the header has no {required!r} column (found: {shown[:200]}){_header_hint(names)}"
            )


def _unbalanced(lines: Sequence[tuple[int, str]]) -> bool:
    """An odd number of quote characters: a quoted field was opened and never closed."""
    return sum(text.count('"') for _, text in lines) % 2 == 1


class _CsvRecords:
    def __init__(self, stream: BinaryIO, cap: int) -> None:
        if csv.field_size_limit() < _CSV_FIELD_LIMIT:
            csv.field_size_limit(_CSV_FIELD_LIMIT)
        self._lines = _Lines(stream, cap)
        self._reader = self._new_reader()
        self.columns = self._header()

    def _new_reader(self) -> Iterator[list[str]]:
        return csv.reader(self._lines.texts(), strict=False)

    def _header(self) -> list[str]:
        try:
            for fields in self._reader:
                if self._lines.bad:
                    raise ManifestUnreadable(f"line {self._lines.bad[0]} is not UTF-8 text")
                if self._lines.too_long:
                    raise ManifestUnreadable(
                        f"line {self._lines.too_long[0]} is over {self._lines.cap} bytes"
                    )
                if any(f.strip() for f in fields):
                    names = [f.strip() for f in fields]
                    while not names[-1]:  # trailing commas
                        names.pop()
                    _check_header(names)
                    return names
        except (csv.Error, _RecordTooLarge) as exc:
            raise ManifestUnreadable(
                f"malformed CSV header: {exc or 'an unclosed quote'}"
            ) from None
        raise ManifestUnreadable("the manifest is empty")

    def __iter__(self) -> Iterator[_Record]:
        lines = self._lines
        while True:
            lines.begin_record()
            start = lines.next_number()
            try:
                fields = next(self._reader)
            except StopIteration:
                return
            except (csv.Error, _RecordTooLarge) as exc:
                yield self._broken(start, exc)
                continue
            if lines.eof and len(lines.record) > 1 and _unbalanced(lines.record):
                # csv would make the rest of the file one field: report it, read on.
                yield self._broken(start, None)
                continue
            too_long = lines.take_too_long()
            if too_long:
                lines.take_bad()
                reason = f"line {too_long[0]} is over {lines.cap} bytes (BGSWAP_MAX_FIELD_BYTES)"
                yield _Record(start, None, {}, (FieldError(start, ROW, Codes.FIELD_TOO_LARGE,
                                                           reason),))  # fmt: skip
                continue
            if not fields or (not fields[0].strip() and not any(f.strip() for f in fields)):
                continue  # a blank line, or only commas
            yield self._record(start, fields)

    def _broken(self, start: int, exc: Exception | None) -> _Record:
        """The record from line ``start`` cannot be read; its later lines are read again."""
        lines = self._lines
        lines.take_bad()
        lines.take_too_long()
        if isinstance(exc, csv.Error):
            error = FieldError(start, ROW, Codes.INVALID_VALUE, f"malformed CSV: {exc}")
            lines.begin_record()  # csv went past it already
        elif isinstance(exc, _RecordTooLarge):
            reason = (
                f"the row from line {start} is over {lines.cap} bytes (BGSWAP_MAX_FIELD_BYTES): "
                f"a quote opened on line {start} and never closed?"
            )
            error = FieldError(start, ROW, Codes.FIELD_TOO_LARGE, reason)
            lines.give_back()
        else:
            reason = f"a quoted field opened on line {start} is never closed (the file ends in it)"
            error = FieldError(start, ROW, Codes.UNTERMINATED_QUOTE, reason)
            lines.give_back()
        self._reader = self._new_reader()
        return _Record(start, None, {}, (error,))

    def _record(self, line: int, fields: list[str]) -> _Record:
        width = len(self.columns)
        errors: tuple[FieldError, ...] = ()
        if len(fields) > width and any(f.strip() for f in fields[width:]):
            reason = f"{len(fields)} fields, but the header has {width} columns"
            errors = (FieldError(line, ROW, Codes.EXTRA_FIELDS, reason),)
        elif len(fields) < width:
            fields += [""] * (width - len(fields))
        values = dict(zip(self.columns, fields, strict=False))
        if self._lines.bad:
            bad = self._lines.take_bad()
            return _Record(line, None, values, (*errors, _not_utf8(line, bad)), _id_of(values))
        return _Record(line, values, values, errors)


# -- JSON Lines ---------------------------------------------------------------------------

# Escapes of UTF-16 surrogates: a lone one decodes to a str that cannot be encoded again.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_RECOVERABLE = re.compile(r'"(id|image|prompt)"\s*:\s*("(?:[^"\\]|\\.)*")')


def _recover(text: str) -> dict[str, str]:
    """id/image/prompt strings from a line that is not valid JSON, for the report."""
    found: dict[str, str] = {}
    for match in _RECOVERABLE.finditer(text):
        try:
            value = json.loads(match.group(2))
        except ValueError:
            continue
        if isinstance(value, str):
            found.setdefault(match.group(1), value)
    return found


def _has_lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    return "null" if value is None else f"a {type(value).__name__}"


def _invalid_json(line: int, text: str, reason: str) -> _Record:
    recovered = _recover(text)
    error = FieldError(line, ROW, Codes.INVALID_JSON, reason)
    return _Record(line, None, recovered, (error,), _id_of(recovered))


def _parse_json_line(line: int, text: str) -> _Record:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return _invalid_json(line, text, f"not valid JSON: {exc.msg} at column {exc.colno}")
    except (ValueError, RecursionError):
        return _invalid_json(line, text, "not valid JSON (nested too deeply)")
    if not isinstance(value, dict):
        return _invalid_json(line, text, f"expected a JSON object, got {_json_kind(value)}")
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        return _invalid_json(line, text, "a string holds an unpaired UTF-16 surrogate escape")
    raw = {k: as_text(v) for k, v in value.items()}
    return _Record(line, value, raw)


class _JsonlRecords:
    def __init__(self, stream: BinaryIO, cap: int) -> None:
        self._lines = _Lines(stream, cap)
        self._texts = self._lines.texts()
        self._first = self._first_record()

    def _first_record(self) -> _Record:
        for text in self._texts:
            self._lines.begin_record()
            if self._lines.too_long:
                raise ManifestUnreadable(
                    f"line {self._lines.number} is over {self._lines.cap} bytes"
                )
            if not text or text.isspace():
                continue
            number = self._lines.number
            if self._lines.bad:
                raise ManifestUnreadable(f"line {number} is not UTF-8 text")
            record = _parse_json_line(number, text)
            if record.values is None:
                raise ManifestUnreadable(f"line {number}: {record.errors[0].reason}")
            return record
        raise ManifestUnreadable("the manifest is empty")

    def __iter__(self) -> Iterator[_Record]:
        yield self._first
        lines = self._lines
        for text in self._texts:
            lines.begin_record()  # one line is one record: nothing to give back
            if lines.take_too_long():
                reason = f"the line is over {lines.cap} bytes (BGSWAP_MAX_FIELD_BYTES)"
                error = FieldError(lines.number, ROW, Codes.FIELD_TOO_LARGE, reason)
                yield _Record(lines.number, None, {}, (error,))
                continue
            if text.isspace():
                continue
            if lines.bad:
                bad = lines.take_bad()
                recovered = _recover(text)
                error = _not_utf8(lines.number, bad)
                yield _Record(lines.number, None, recovered, (error,), _id_of(recovered))
                continue
            yield _parse_json_line(lines.number, text)


# -- duplicates ---------------------------------------------------------------------------


class _SeenIds:
    """Output keys seen so far -> first line, as 64-bit hashes in an open-addressing table.

    12 bytes a slot, 15-30 bytes a row (a dict of digests would take over 100), so memory
    stays far below the manifest's own size. ``hash(str)`` is SipHash with a per-process
    key: a false duplicate needs a 64-bit collision (about 1e-9 for a million rows).
    """

    _MAX_LOAD = 0.8

    def __init__(self, capacity: int = 1024) -> None:
        self._keys = array("Q", [0]) * capacity
        self._lines = array("I", [0]) * capacity
        self._count = 0
        self._limit = int(capacity * self._MAX_LOAD)

    def _slot(self, digest: int) -> int:
        keys = self._keys
        mask = len(keys) - 1
        slot = digest & mask
        while keys[slot] and keys[slot] != digest:
            slot = (slot + 1) & mask
        return slot

    @staticmethod
    def _digest(key: str) -> int:
        return (hash(key) & 0xFFFF_FFFF_FFFF_FFFF) or 1  # 0 marks an empty slot

    def seen(self, key: str) -> int | None:
        """The line where ``key`` was first seen, or None (remembering nothing)."""
        slot = self._slot(self._digest(key))
        return self._lines[slot] if self._keys[slot] else None

    def first_line(self, key: str, line: int) -> int | None:
        """The line where ``key`` was first seen, or None (and remember it at ``line``)."""
        digest = self._digest(key)
        slot = self._slot(digest)
        if self._keys[slot]:
            return self._lines[slot]
        self._keys[slot] = digest
        self._lines[slot] = min(line, 0xFFFF_FFFF)
        self._count += 1
        if self._count > self._limit:
            self._grow()
        return None

    def _grow(self) -> None:
        old_keys, old_lines = self._keys, self._lines
        capacity = 2 * len(old_keys)
        self._keys = array("Q", [0]) * capacity
        self._lines = array("I", [0]) * capacity
        self._limit = int(capacity * self._MAX_LOAD)
        for digest, line in zip(old_keys, old_lines, strict=True):
            if digest:
                slot = self._slot(digest)
                self._keys[slot] = digest
                self._lines[slot] = line


# -- outcomes -----------------------------------------------------------------------------


def _id_of(values: Mapping[str, object]) -> str | None:
    value = values.get("id")
    return (value.strip() or None) if isinstance(value, str) else None


def _duplicate(seen: _SeenIds, row_id: str, line: int) -> FieldError | None:
    try:
        key = safe_id(row_id)
    except UnicodeEncodeError:
        key = row_id
    first = seen.first_line(key, line)
    if first is None:
        return None
    reason = f"duplicate id {row_id[:100]!r} (first seen on line {first})"
    return FieldError(line, "id", Codes.DUPLICATE_ID, reason)


def output_keys(spec: JobSpec, defaults: RowDefaults) -> list[str]:
    """The row's result objects as compared for collisions: without their image extension
    (a provider may pick the format) and case-folded (case-insensitive filesystems, S3
    consoles), so ``x`` and ``x.jpg``, or ``P`` and ``p.png``, are the same object."""
    if spec.output:
        base = spec.output.partition("?")[0] if "://" in spec.output[:8] else spec.output
    else:
        base = f"{defaults.destination_root}/{safe_id(spec.id)}"
    stem = split_image_extension(base)[0].casefold()
    if spec.num_results == 1:
        return [stem]
    return [f"{stem}-{n}" for n in range(1, spec.num_results + 1)]


def _collision(
    seen: _SeenIds, spec: JobSpec, line: int, defaults: RowDefaults
) -> FieldError | None:
    keys = output_keys(spec, defaults)
    for key in keys:
        first = seen.seen(key)
        if first is not None:
            shown = key.rpartition("/")[2][:100]
            reason = f"its output {shown!r} is the same object as the output of line {first}"
            return FieldError(line, "output" if spec.output else "id", Codes.DUPLICATE_OUTPUT,
                              reason)  # fmt: skip
    for key in keys:
        seen.first_line(key, line)
    return None


class _UnknownColumns:
    """Unknown columns close to a known one, each warned about once. JSON Lines keys
    differ from row to row, so at most ``limit`` distinct names are looked at: memory
    stays bounded whatever the manifest holds."""

    def __init__(self, limit: int = 1000) -> None:
        self._seen: set[str] = set()
        self._limit = limit

    def warnings(self, values: Mapping[str, object] | None) -> tuple[str, ...]:
        if values is None:
            return ()
        found: list[str] = []
        for name in values:
            if name in KNOWN_COLUMNS or name in self._seen or len(self._seen) >= self._limit:
                continue
            self._seen.add(name)
            suggestion = column_suggestion(name, values)
            if suggestion is not None:
                found.append(unknown_column_warning(name, suggestion))
        return tuple(found)


def _outcomes(records: Iterator[_Record], defaults: RowDefaults) -> Iterator[RowOutcome]:
    seen = _SeenIds()
    outputs = _SeenIds()
    columns = _UnknownColumns()
    for index, record in enumerate(records):
        errors = list(record.errors)
        spec: JobSpec | None = None
        row_id = record.row_id
        if record.values is not None:
            row_id = _id_of(record.values)
            result = validate_row(record.values, line=record.line, defaults=defaults)
            if isinstance(result, JobSpec):
                spec = result
            else:
                errors.extend(result)
        if row_id is not None:
            duplicate = _duplicate(seen, row_id, record.line)
            if duplicate is not None:
                errors.append(duplicate)
        if spec is not None and not errors:
            collision = _collision(outputs, spec, record.line, defaults)
            if collision is not None:
                errors.append(collision)
        yield RowOutcome(
            index=index,
            line=record.line,
            row_id=row_id,
            spec=None if errors else spec,
            errors=tuple(errors),
            raw=record.raw,
            warnings=columns.warnings(record.values),
        )


def read_manifest(stream: BinaryIO, fmt: Format, defaults: RowDefaults) -> Iterator[RowOutcome]:
    """One ``RowOutcome`` per data row, in input order, read as it is consumed.

    The header (CSV) or first record (JSON Lines) is read by this call itself, so
    ``ManifestUnreadable`` is raised here, before any row, when the input is not a
    manifest; after that no input makes the iteration raise.
    """
    records: Iterator[_Record]
    if fmt == "csv":
        records = iter(_CsvRecords(stream, defaults.max_field_bytes))
    elif fmt == "jsonl":
        records = iter(_JsonlRecords(stream, defaults.max_field_bytes))
    else:
        raise ValueError(f"unknown manifest format {fmt!r}")
    return _outcomes(records, defaults)
