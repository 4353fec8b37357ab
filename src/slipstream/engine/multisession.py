"""``multi_session: N``: one job split over N processes, each with its own SSH session and
UDP socket, so a transfer can use more than one core.

The split happens on the *sending* side, whichever host that is, so it works for uploads
and downloads alike: every session expands the same sources in the same order and keeps
the entries that :func:`select_share` assigns to its ``multi_session_index``. Folders are
announced by session 0 only. The target and minimum rates are divided by N, so the job as a
whole stays within them.

**Whole files** go to the session with the fewest bytes so far: deterministic, and balanced
by size.

**Split files** (``multi_session_threshold``): with N > 1 and a threshold > 0, every file of
at least that many bytes is cut by :func:`split_ranges` into up to N contiguous byte ranges
that start on multiples of :data:`SPLIT_ALIGN` (1 MiB: a multiple of every page and file-
system block size, and independent of the datagram size, which each session negotiates on
its own after the split is fixed). The least loaded sessions get the ranges; each sends its
range as a :class:`PieceEntry`, announced with ``FILE {..., size: WHOLE, range: [offset,
length]}``. The receiver writes every range into the one shared ``NAME.partial`` at its
offsets, verifies each range's digest on its own, and coordinates through the sidecar
``NAME.partial.ranges`` (engine/resume.py :class:`~slipstream.engine.resume.RangeRecord`,
under ``flock``, so it works between the server's sessions in one process and between a
downloading client's processes): the first range to decide stamps the verdict for the whole
file (the others follow it), and the range that completes the coverage renames the file,
exactly once. docs/protocol.md section 13 ("Split files") has the rules.

Every session of a job carries the same random ``multi_session_job`` id in its spec, which
tells the receiver which stamps belong to this run and which to an earlier, interrupted one.

Limits: files are never split over the HTTPS fallback, nor with content protection,
file_checksum or obfuscated names (UsageError); the server runs every session in its one
process; a live rate change (``RateControl``) reaches only a single-session job.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any

from slipstream.engine.paths import SourceEntry
from slipstream.errors import SlipstreamError, UsageError, error_from_dict

Emit = Callable[[dict[str, Any]], None]
INDEX_FIELD = "multi_session_index"  # an extra spec field: which share this session sends
JOB_FIELD = "multi_session_job"  # an extra spec field: the same random id in every share
SPLIT_ALIGN = 1 << 20  # split files' ranges start on multiples of this


def session_count(spec: Any) -> int:
    return max(1, int(getattr(spec, "multi_session", None) or 1))


def session_index(spec: Any) -> int | None:
    value = (getattr(spec, "model_extra", None) or {}).get(INDEX_FIELD)
    return int(value) if value is not None else None


def session_job(spec: Any) -> str | None:
    value = (getattr(spec, "model_extra", None) or {}).get(JOB_FIELD)
    return str(value) if value else None


def split_threshold(spec: Any) -> int:
    """Files of at least this many bytes are split over the sessions; 0 = never."""
    if session_count(spec) <= 1:
        return 0
    return max(0, int(getattr(spec, "multi_session_threshold", None) or 0))


def check_split(spec: Any) -> None:
    """Refuse what a split file cannot honour (UsageError), before anything connects."""
    if not split_threshold(spec):
        return
    reasons = {
        "content_protection": "each session would seal its range under another key",
        "file_checksum": "no session reads the whole file to checksum it",
        "obfuscate_file_names": "each session would store its range under another name",
    }
    for name, why in reasons.items():
        if getattr(spec, name, None) not in (None, False, "none"):
            raise UsageError(f"multi_session_threshold cannot be combined with {name}: {why}")


@dataclass(frozen=True)
class PieceEntry(SourceEntry):
    """One byte range of a split file: this session sends ``[offset, offset + length)``."""

    offset: int = 0
    length: int = 0

    @classmethod
    def of(cls, entry: SourceEntry, offset: int, length: int) -> PieceEntry:
        base = {f.name: getattr(entry, f.name) for f in fields(SourceEntry)}
        return cls(**base, offset=offset, length=length)


def split_ranges(size: int, parts: int, align: int = SPLIT_ALIGN) -> list[tuple[int, int]]:
    """``(offset, length)`` ranges that cover ``[0, size)`` exactly, in order.

    At most ``parts`` of them, none empty (unless ``size`` is 0), every offset a multiple of
    ``align``; their lengths differ by at most one ``align`` unit (the last may be shorter).
    """
    if size <= 0:
        return [(0, 0)]
    units = -(-size // align)
    parts = max(1, min(parts, units))
    base, extra = divmod(units, parts)
    ranges: list[tuple[int, int]] = []
    start = 0
    for part in range(parts):
        end = min(size, start + (base + (part < extra)) * align)
        ranges.append((start, end - start))
        start = end
    return ranges


def select_share(entries: Iterable[Any], spec: Any, *, split: bool = True) -> Iterator[Any]:
    """The entries this session sends: all of them unless the spec is one of N shares.

    ``split=False`` never splits a file (the HTTPS fallback, which sends files whole).
    """
    index, count = session_index(spec), session_count(spec)
    if index is None or count <= 1:
        yield from entries
        return
    threshold = split_threshold(spec) if split else 0
    loads = [0] * count
    for entry in entries:
        if entry.kind == "dir":
            if index == 0:
                yield entry
            continue
        ranges = split_ranges(entry.size, count) if _splits(entry, threshold) else []
        if len(ranges) > 1:
            piece = _deal_ranges(entry, ranges, loads, index)
            if piece is not None:
                yield piece
            continue
        owner = min(range(count), key=lambda i: (loads[i], i))
        loads[owner] += max(1, int(entry.size))
        if owner == index:
            yield entry


def _splits(entry: Any, threshold: int) -> bool:
    return bool(threshold) and entry.kind == "file" and int(entry.size) >= threshold


def _deal_ranges(
    entry: SourceEntry, ranges: list[tuple[int, int]], loads: list[int], index: int
) -> PieceEntry | None:
    """This session's range of a split file, or None. The ranges go to the least loaded
    sessions, the first (never shorter) range to the least loaded one."""
    owners = sorted(range(len(loads)), key=lambda i: (loads[i], i))
    mine = None
    for owner, (offset, length) in zip(owners, ranges, strict=False):
        loads[owner] += length
        if owner == index:
            mine = PieceEntry.of(entry, offset, length)
    return mine


def share_specs(spec: Any) -> list[dict[str, Any]]:
    """One spec per session: its index, the job's id (when files split), and 1/N of the
    target and minimum rates."""
    count = session_count(spec)
    body = spec.to_json_dict()
    # Split files: tells this run's range stamps from an earlier run's (engine/resume.py).
    job = {JOB_FIELD: secrets.token_hex(8)} if split_threshold(spec) else {}
    specs = []
    for index in range(count):
        part = {**body, INDEX_FIELD: index, **job}
        for name in ("target_rate_kbps", "min_rate_kbps"):
            if body.get(name):
                part[name] = max(1, int(body[name]) // count)
        specs.append(part)
    return specs


def _child(spec: dict[str, Any], options: dict[str, Any], events: Any) -> None:
    """One session, in its own process: run it, forward its events, report the outcome."""
    from pathlib import Path

    from slipstream.engine.job import ClientOptions, transfer

    paths: dict[str, Any] = {k: Path(v) if v else None for k, v in options["paths"].items()}
    plain: dict[str, Any] = {k: v for k, v in options.items() if k != "paths"}
    client = ClientOptions(**plain, **paths)
    index = int(spec[INDEX_FIELD])

    def forward(event: dict[str, Any]) -> None:
        events.put(("event", index, event))

    try:
        result = asyncio.run(transfer(spec, forward, client))
        events.put(("done", index, result.as_dict()))
    except SlipstreamError as exc:
        events.put(("error", index, exc.to_dict()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as a failure
        events.put(("error", index, {"code": 1, "internal_message": repr(exc)}))


def _picklable_options(options: Any) -> dict[str, Any]:
    return {
        "password": options.password,
        "key_files": list(options.key_files),
        "accept_new_host": options.accept_new_host,
        "udp_timeout": options.udp_timeout,
        "progress_interval": options.progress_interval,
        "paths": {
            "known_hosts": str(options.known_hosts) if options.known_hosts else None,
            "cwd": str(options.cwd) if options.cwd else None,
            "docroot": str(getattr(options, "docroot", None) or "") or None,
        },
    }


async def run_multi_session(spec: Any, emit: Emit, options: Any) -> dict[str, Any]:
    """Run the N sessions as child processes; returns the summed totals (as_dict shape).

    Progress events are merged into one stream (bytes summed over the sessions); every
    other event is passed on with a ``session_index``. Raises the first session's error.
    """
    ctx = multiprocessing.get_context("spawn")  # no inherited event loop or sockets
    events = ctx.Queue()
    picklable = _picklable_options(options)
    children = [
        ctx.Process(target=_child, args=(part, picklable, events), daemon=True)
        for part in share_specs(spec)
    ]
    started = time.monotonic()
    for child in children:
        child.start()
    try:
        outcomes = await asyncio.to_thread(_collect, events, children, emit)
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()  # our own child, by its handle
            child.join(5)
    errors = [body for kind, body in outcomes.values() if kind == "error"]
    if errors:
        raise error_from_dict(errors[0])
    totals = _sum_totals([body for _kind, body in outcomes.values()])
    totals["elapsed_s"] = round(time.monotonic() - started, 6)
    totals["rate_bps"] = totals["bytes"] * 8 / max(totals["elapsed_s"], 1e-9)
    totals["sessions"] = len(children)
    return totals


def _collect(events: Any, children: list[Any], emit: Emit) -> dict[int, tuple[str, Any]]:
    outcomes: dict[int, tuple[str, Any]] = {}
    progress: dict[int, dict[str, Any]] = {}
    while len(outcomes) < len(children):
        try:
            kind, index, body = events.get(timeout=0.5)
        except queue.Empty:
            for index, child in enumerate(children):
                if not child.is_alive() and index not in outcomes and child.exitcode:
                    outcomes[index] = ("error", {"code": 1, "internal_message": "crashed"})
            continue
        if kind != "event":
            outcomes[index] = (kind, body)
            continue
        if body.get("type") == "progress":
            progress[index] = body
            emit(_merged_progress(progress))
        else:
            with contextlib.suppress(Exception):
                emit({**body, "session_index": index})
    return outcomes


def _merged_progress(progress: dict[int, dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"type": "progress", "sessions": len(progress)}
    for key in ("bytes", "rate_bps", "files_done", "files_skipped", "files_failed"):
        merged[key] = sum(p.get(key) or 0 for p in progress.values())
    expected = [p.get("bytes_expected") for p in progress.values()]
    merged["bytes_expected"] = sum(e for e in expected if e) or None
    merged["elapsed_s"] = max(p.get("elapsed_s") or 0 for p in progress.values())
    return merged


def _sum_totals(parts: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("files_done", "files_skipped", "files_failed", "dirs", "bytes")
    return {key: sum(int(p.get(key) or 0) for p in parts) for key in keys}
