"""What a session did: the counts every transport reports in events and logs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SessionTotals"]


@dataclass
class SessionTotals:
    """What a session did, reported in events and logs."""

    files_done: int = 0
    files_skipped: int = 0
    files_failed: int = 0
    files_excluded: int = 0  # left out by filter rules or time windows
    dirs: int = 0
    links: int = 0
    bytes_files: int = 0  # bytes of completed files
    bytes_resumed: int = 0  # of those, bytes a resume did not need to send again
    started: float = field(default_factory=time.monotonic)
    finished: float = 0.0
    errors: list[dict[str, Any]] = field(default_factory=list)

    def file_landed(self, size: int, resumed: int) -> None:
        """One more file done: ``size`` bytes, ``resumed`` of them not sent again."""
        self.files_done += 1
        self.bytes_files += size
        self.bytes_resumed += resumed

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def as_dict(self) -> dict[str, Any]:
        elapsed = max(self.elapsed, 1e-9)
        return {
            "files_done": self.files_done,
            "files_skipped": self.files_skipped,
            "files_failed": self.files_failed,
            "files_excluded": self.files_excluded,
            "dirs": self.dirs,
            "links": self.links,
            "bytes": self.bytes_files,
            "bytes_resumed": self.bytes_resumed,
            "elapsed_s": round(self.elapsed, 6),
            "rate_bps": self.bytes_files * 8 / elapsed,
        }
