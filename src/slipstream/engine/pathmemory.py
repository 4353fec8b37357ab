"""Careful resume across sessions: what the last session on a path learned of it.

A fresh session's start-up doubles its rate from 10 Mbit/s every round trip: on a
1 Gbit/s, 100 ms path that leaves about 0.6 s mostly unused. A sender that remembers what
the previous session to the same peer delivered hands that to its rate controller, which
jumps to half of it once the first RTT sample shows the path is the same one
(``resume_path`` in protocol/rate/fair.py); start-up's own checks then catch a path that
has become slower since. Only a session that left start-up records anything, so a short
or app-limited transfer never overwrites a good memory with a low one.

The sending side remembers: the client in a small JSON file in the user's cache folder,
keyed by the server's address; the server in memory, keyed by the client's address (it
sends downloads). Entries expire after an hour. ``SLIPSTREAM_PATH_MEMORY=0`` turns it off,
for cold starts that must not depend on the previous run (benchmarks).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import platformdirs

from slipstream.protocol.rate import PathEstimate

log = logging.getLogger("slipstream.engine")

ENV_SWITCH = "SLIPSTREAM_PATH_MEMORY"
MAX_AGE = 3600.0  # seconds: paths change (other traffic, another route); forget them
MAX_ENTRIES = 256


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "no", "off", "false")


class PathMemory:
    """Path estimates by peer address, in memory and optionally in a JSON file."""

    def __init__(self, file: Path | None = None) -> None:
        self._file = file
        self._entries: dict[str, dict[str, float]] = {}
        self._loaded = file is None

    @classmethod
    def for_client(cls) -> PathMemory:
        return cls(platformdirs.user_cache_path("slipstream") / "paths.json")

    def recall(self, peer: str, now: float | None = None) -> PathEstimate | None:
        if not enabled():
            return None
        entry = self._load().get(peer)
        now = time.time() if now is None else now
        if entry is None or not 0 <= now - entry["at"] <= MAX_AGE:
            return None
        return PathEstimate(entry["rate"], entry["min_rtt"])

    def remember(self, peer: str, estimate: PathEstimate | None, now: float | None = None) -> None:
        if estimate is None or not enabled():
            return
        entries = self._load()
        at = time.time() if now is None else now
        entries[peer] = {"rate": estimate.rate, "min_rtt": estimate.min_rtt, "at": at}
        for stale in sorted(entries, key=lambda p: entries[p]["at"])[:-MAX_ENTRIES]:
            del entries[stale]
        self._save()

    # A cache: any problem with the file only costs a cold start, never the transfer.

    def _load(self) -> dict[str, dict[str, float]]:
        if not self._loaded and self._file is not None:
            self._loaded = True
            try:
                raw = json.loads(self._file.read_text(encoding="utf-8"))
                self._entries = {str(k): _entry(v) for k, v in raw.items()}
            except FileNotFoundError:
                pass
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
                log.debug("ignoring the path memory %s: %s", self._file, exc)
        return self._entries

    def _save(self) -> None:
        if self._file is None:
            return
        tmp: str | None = None
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._file.parent, prefix=".paths-")
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(self._entries, out)
            os.replace(tmp, self._file)  # atomic: a concurrent reader sees old or new
        except OSError as exc:
            log.debug("cannot write the path memory %s: %s", self._file, exc)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


def resume_path(sender: Any, memory: PathMemory, peer: str) -> None:
    """Give a new sender's rate controller what ``memory`` holds for ``peer``, if anything."""
    hint = memory.recall(peer)
    if hint is not None:
        sender.rate_controller.resume_path(hint.rate, hint.min_rtt)


def _entry(value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError("not an object")
    entry = {key: float(value[key]) for key in ("rate", "min_rtt", "at")}
    if entry["rate"] <= 0 or entry["min_rtt"] <= 0:
        raise ValueError("not a path estimate")
    return entry
