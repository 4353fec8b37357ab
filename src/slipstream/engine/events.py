"""Pieces of the events the drivers emit that both sides (and the HTTPS fallback) build alike.

The event types themselves are listed in docs/architecture.md, "Events".
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_checksum", "file_done_event", "range_event", "span_fields"]


def add_checksum(event: dict[str, Any], algorithm: str | None, value: Any) -> None:
    """The checksum the user asked for (``file_checksum``), when there is one."""
    if algorithm and value:
        event["file_checksum"] = value
        event["file_checksum_type"] = algorithm


def file_done_event(incoming: Any, result: Any, size: int, algorithm: str | None) -> dict[str, Any]:
    """A received file verified and in place (``incoming``: an IncomingFile, ``result``: its
    FinishResult): the same event over UDP and over the HTTPS fallback."""
    event: dict[str, Any] = {
        "type": "file_done",
        "path": incoming.dest_rel,
        "size": size,
        "digest": result.digests.digest,
        "file": str(incoming.final),
    }
    add_checksum(event, algorithm, result.digests.checksum)
    if incoming.offset:
        event["resumed_from"] = incoming.offset
    if result.backup is not None:
        event["saved_as"] = str(result.backup)
    return event


def span_fields(start: int, end: int) -> dict[str, int]:
    """A split file's range ``[start, end)`` as event fields."""
    return {"offset": start, "length": end - start}


def range_event(
    path: str, size: int, start: int, end: int, digest: str | None, resumed: int
) -> dict[str, Any]:
    """One range of a split file verified (each session reports its own)."""
    event: dict[str, Any] = {"type": "range_done", "path": path, "size": size}
    event |= {"offset": start, "length": end - start, "digest": digest}
    if resumed > start:
        event["resumed_from"] = resumed
    return event
