"""``multi_session: N``: one job split over N processes, each with its own SSH session and
UDP socket, so a transfer can use more than one core.

The split happens on the *sending* side, whichever host that is, so it works for uploads
and downloads alike: every session expands the same sources in the same order and keeps
the files that :func:`select_share` assigns to its ``multi_session_index`` (each file goes
to the session with the fewest bytes so far: deterministic, and balanced by size). Folders
are announced by session 0 only. The target and minimum rates are divided by N, so the job
as a whole stays within them.

Limits: a single file is never split across sessions (``multi_session_threshold`` is not
implemented), so one huge file still moves on one core per side; the server runs every
session in its one process; a live rate change (``RateControl``) reaches only a single-
session job.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from slipstream.errors import SlipstreamError, error_from_dict

Emit = Callable[[dict[str, Any]], None]
INDEX_FIELD = "multi_session_index"  # an extra spec field: which share this session sends


def session_count(spec: Any) -> int:
    return max(1, int(getattr(spec, "multi_session", None) or 1))


def session_index(spec: Any) -> int | None:
    value = (getattr(spec, "model_extra", None) or {}).get(INDEX_FIELD)
    return int(value) if value is not None else None


def select_share(entries: Iterable[Any], spec: Any) -> Iterator[Any]:
    """The entries this session sends: all of them unless the spec is one of N shares."""
    index, count = session_index(spec), session_count(spec)
    if index is None or count <= 1:
        yield from entries
        return
    loads = [0] * count
    for entry in entries:
        if entry.kind == "dir":
            if index == 0:
                yield entry
            continue
        owner = min(range(count), key=lambda i: (loads[i], i))
        loads[owner] += max(1, int(entry.size))
        if owner == index:
            yield entry


def share_specs(spec: Any) -> list[dict[str, Any]]:
    """One spec per session: its index, and 1/N of the target and minimum rates."""
    count = session_count(spec)
    body = spec.to_json_dict()
    specs = []
    for index in range(count):
        part = {**body, INDEX_FIELD: index}
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
