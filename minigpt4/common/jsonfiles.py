"""One reader for every JSON / JSON-lines file a user hands in (caption annotations, POPE questions and
answers, CHAIR image lists, captions and COCO annotations, prediction files).

What it guarantees, so each reader need not:
  * UTF-8, with or without a byte-order mark (Windows editors write one); other bytes are an error naming
    the line and offset;
  * strict JSON: Python's json accepts NaN, Infinity and -Infinity, which are not JSON and would turn into
    a silent NaN in a score or a caption id; they are refused, naming line and column;
  * only regular files: a FIFO or a link to /dev/zero would block or never end;
  * every error is a `DataFileError` whose message starts with `file:line[:column]:`.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

from minigpt4.common.files import NotRegularFileError, require_regular_file

# A JSON string (skipped whole, so "NaN" inside a caption does not count) or a non-standard constant.
_CONSTANT_OUTSIDE_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|(-?Infinity|NaN)')


class DataFileError(ValueError):
    """A user's data file is missing, unreadable or malformed; the message names the file (and line)."""


class _NonFiniteConstant(ValueError):
    pass


def _refuse_constant(token: str) -> Any:
    raise _NonFiniteConstant(token)


def decode_utf8(data: bytes, source: str | os.PathLike) -> str:
    """Bytes -> text; a leading UTF-8 byte-order mark is dropped (utf-8-sig)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataFileError(f"{source}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                            "save the file as UTF-8") from None


def read_text(path: str | os.PathLike) -> str:
    """A regular file's text (see `decode_utf8`); a FIFO, a device or a folder is refused before it is opened."""
    try:
        require_regular_file(path)
    except NotRegularFileError as err:
        raise DataFileError(f"{path}: {err.reason}") from None
    with open(path, "rb") as handle:
        return decode_utf8(handle.read(), path)


def _where_constant(text: str, token: str) -> tuple[int, int]:
    """(line, column), 1-based, of the first `token` that is not inside a string."""
    for match in _CONSTANT_OUTSIDE_STRINGS.finditer(text):
        if match.group(1) == token:
            start = match.start(1)
            line = text.count("\n", 0, start) + 1
            return line, start - (text.rfind("\n", 0, start) + 1) + 1
    return 1, 1  # not reached for text json rejected because of `token`


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_refuse_constant)


def _constant_message(token: str) -> str:
    return f"{token} is not valid JSON (JSON numbers are finite); write a number or null"


def parse_json(text: str, source: str | os.PathLike) -> Any:
    """One JSON document; errors read `source:line:column: ...`."""
    try:
        return _loads(text)
    except _NonFiniteConstant as err:
        line, column = _where_constant(text, str(err))
        raise DataFileError(f"{source}:{line}:{column}: {_constant_message(str(err))}") from None
    except json.JSONDecodeError as err:
        raise DataFileError(f"{source}:{err.lineno}:{err.colno}: malformed JSON: {err.msg}") from None


def parse_jsonl(text: str, source: str | os.PathLike) -> list[tuple[int, Any]]:
    """(line number, value) for every non-blank line (a trailing blank line is common and harmless)."""
    rows = []
    # split on "\n" only: str.splitlines also breaks at U+2028 and friends, which JSON allows raw in strings
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, _loads(line)))
        except _NonFiniteConstant as err:
            _, column = _where_constant(line, str(err))
            raise DataFileError(f"{source}:{number}:{column}: {_constant_message(str(err))}") from None
        except json.JSONDecodeError as err:
            raise DataFileError(f"{source}:{number}: not valid JSON ({err.msg}, column {err.colno})") from None
    return rows


def read_json(path: str | os.PathLike) -> Any:
    return parse_json(read_text(path), path)


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, Any]]:
    return parse_jsonl(read_text(path), path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`text` as UTF-8, written whole or not at all: to a temporary file beside `path`, then `os.replace`, so a
    crash leaves the previous file (or none), never half of one. Creates the folder."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
    """`obj` as UTF-8 JSON with a final newline, written atomically (write_text_atomic)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
