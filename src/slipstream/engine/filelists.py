"""ascp-style ``--file-list`` and ``--file-pair-list`` files.

A file list has one source per line; a pair list alternates source and destination lines.
Both turn into the ``(source, destination)`` pairs that
:func:`slipstream.engine.paths.expand_sources` takes.

The files are UTF-8 (a leading byte-order mark is tolerated, as Windows editors write one).
Lines end with ``\\n`` or ``\\r\\n``; blank and whitespace-only lines are ignored, so names made
only of whitespace cannot be listed. Other whitespace is kept: ``" a.txt"`` is a name with a
leading space, not ``a.txt``. Lines are split on ``\\n`` only, never on the other characters
``str.splitlines`` treats as breaks, since those may appear in file names.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from slipstream.errors import PathError, PermissionDenied, SourceNotFound, UsageError

__all__ = [
    "parse_file_list",
    "parse_file_pair_list",
    "read_file_list",
    "read_file_pair_list",
]

_BOM = "\ufeff"


def _decode(data: bytes, name: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UsageError(
            f"{name}: line {line} is not valid UTF-8 (byte {exc.start}); "
            "file lists must be UTF-8 text"
        ) from exc
    return text.removeprefix(_BOM)


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for every non-blank line, numbered from 1."""
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line


def parse_file_list(text: str, *, name: str = "file list") -> list[tuple[str, None]]:
    """The sources of a file list's text, one per non-blank line."""
    pairs: list[tuple[str, None]] = [(line, None) for _, line in _lines(text.removeprefix(_BOM))]
    if not pairs:
        raise UsageError(f"{name}: names no file")
    return pairs


def parse_file_pair_list(text: str, *, name: str = "file pair list") -> list[tuple[str, str]]:
    """The ``(source, destination)`` pairs of a pair list's text (alternating lines)."""
    lines = list(_lines(text.removeprefix(_BOM)))
    if not lines:
        raise UsageError(f"{name}: names no file")
    if len(lines) % 2:
        number, source = lines[-1]
        raise UsageError(f"{name}: line {number}: source {source!r} has no destination line")
    return [(src, dest) for (_, src), (_, dest) in zip(lines[::2], lines[1::2], strict=True)]


def _read(path: str | os.PathLike[str]) -> tuple[str, str]:
    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise SourceNotFound(f"File list {name!r} does not exist") from exc
    except PermissionError as exc:
        raise PermissionDenied(f"Permission denied reading file list {name!r}") from exc
    except OSError as exc:  # a folder, an I/O error
        raise PathError(f"Cannot read file list {name!r}: {exc.strerror}") from exc
    return _decode(data, name), name


def read_file_list(path: str | os.PathLike[str]) -> list[tuple[str, None]]:
    """Read an ascp ``--file-list`` file."""
    text, name = _read(path)
    return parse_file_list(text, name=name)


def read_file_pair_list(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Read an ascp ``--file-pair-list`` file."""
    text, name = _read(path)
    return parse_file_pair_list(text, name=name)
