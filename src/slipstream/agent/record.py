"""One transfer as the agent keeps it, and its Connect ``TransferInfo`` view.

The record is plain data (saved as JSON in the store). Engine events are folded into it
by :meth:`TransferRecord.apply_event`; :meth:`TransferRecord.to_info` renders what the SDK
reads, honouring the page's ``return_paths`` / ``return_files``.
"""

from __future__ import annotations

import time
import uuid as uuidlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import PurePath
from typing import Any

from slipstream.spec import TRANSFER_STATUS

SECRET_FIELDS = (
    "remote_password",
    "token",
    "content_protection_passphrase",
    "ssh_private_key",
    "ssh_private_key_passphrase",
    "password",
)
ACTIVE = {TRANSFER_STATUS.INITIATING, TRANSFER_STATUS.QUEUED, TRANSFER_STATUS.RUNNING}
WAITING = {TRANSFER_STATUS.WILLRETRY}
FINISHED = {
    TRANSFER_STATUS.COMPLETED,
    TRANSFER_STATUS.FAILED,
    TRANSFER_STATUS.CANCELLED,
    TRANSFER_STATUS.REMOVED,
}
MAX_FILES_KEPT = 1000
XFER_RETRY_SECONDS = 3600


def local_time(epoch: float | None) -> str:
    """Connect's time format: local ISO text without zone, ``""`` when not yet."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(epoch)) if epoch else ""


@dataclass
class TransferRecord:
    uuid: str
    app_id: str
    seq: int
    spec: dict[str, Any]  # the effective spec given to the engine (secrets included)
    connect_settings: dict[str, Any]
    status: str = TRANSFER_STATUS.INITIATING
    previous_status: str = TRANSFER_STATUS.INITIATING
    token: int = 0
    add_time: float = field(default_factory=time.time)
    start_time: float | None = None
    modify_time: float | None = None
    end_time: float | None = None
    bytes_expected: int = 0
    bytes_written: int = 0
    rate_kbps: float = 0.0
    elapsed_usec: int = 0
    current_file: str = ""
    explorer_path: str = ""
    files_done: int = 0
    files_skipped: int = 0
    files_failed: int = 0
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    attempts: int = 0
    error: dict[str, Any] | None = None
    transport: str = "fasp"

    # --- persistence -----------------------------------------------------------------

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, data: dict[str, Any]) -> TransferRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    # --- state -----------------------------------------------------------------------

    def set_status(self, status: str) -> None:
        if status == self.status:
            return
        self.previous_status, self.status = self.status, status
        now = time.time()
        if status == TRANSFER_STATUS.RUNNING and self.start_time is None:
            self.start_time = now
        if status in FINISHED:
            self.end_time = now
            self.rate_kbps = 0.0
        elif status in ACTIVE:
            self.end_time = None

    def touch(self) -> None:
        self.modify_time = time.time()

    @property
    def direction(self) -> str:
        return str(self.spec.get("direction", "send"))

    @property
    def remaining_usec(self) -> int:
        left = max(self.bytes_expected - self.bytes_written, 0)
        if self.status in FINISHED or self.rate_kbps <= 0:
            return 0
        return int(left * 8 / (self.rate_kbps * 1000) * 1e6)

    @property
    def percentage(self) -> float:
        if self.status == TRANSFER_STATUS.COMPLETED:
            return 1.0
        if self.bytes_expected <= 0:
            return 0.0
        return min(self.bytes_written / self.bytes_expected, 1.0)

    # --- engine events ---------------------------------------------------------------

    def apply_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "progress":
            self._on_progress(event)
        elif kind in ("file_done", "file_skipped", "file_error"):
            self._on_file(kind, event)
        elif kind == "session_start" and event.get("transport"):
            self.transport = str(event["transport"])

    def _on_progress(self, event: dict[str, Any]) -> None:
        self.bytes_written = int(event.get("bytes") or 0)
        expected = event.get("bytes_expected")
        if expected:
            self.bytes_expected = max(self.bytes_expected, int(expected))
        self.rate_kbps = round(float(event.get("rate_bps") or 0) / 1000, 1)
        self.elapsed_usec = int(float(event.get("elapsed_s") or 0) * 1e6)

    def _on_file(self, kind: str, event: dict[str, Any]) -> None:
        name = str(event.get("file") or event.get("path") or "")
        size = int(event.get("size") or 0)
        if kind == "file_done":
            self.files_done += 1
        elif kind == "file_skipped":
            self.files_skipped += 1
        else:
            self.files_failed += 1
        self.current_file = name
        self.files[name] = {
            "bytes_expected": size,
            "bytes_written": size if kind == "file_done" else 0,
            "fasp_file_id": str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"{self.uuid}/{name}")),
            "file": name,
        }
        if len(self.files) > MAX_FILES_KEPT:
            self.files.pop(next(iter(self.files)))

    # --- the Connect view ------------------------------------------------------------

    def public_spec(self, *, with_paths: bool = True) -> dict[str, Any]:
        """The transfer spec as pages see it: secrets removed, Connect's tags added."""
        spec = {k: v for k, v in self.spec.items() if k not in SECRET_FIELDS}
        tags = dict(spec.get("tags") or {})
        tags["aspera"] = {
            **dict(tags.get("aspera") or {}),
            "index": 0,
            "xfer_id": self.uuid,
            "xfer_retry": XFER_RETRY_SECONDS,
        }
        spec["tags"] = tags
        if not with_paths:
            spec.pop("paths", None)
        return spec

    @property
    def title(self) -> str:
        if self.spec.get("title"):
            return str(self.spec["title"])
        paths = self.spec.get("paths") or [{}]
        first = str(paths[0].get("source", ""))
        return PurePath(first).name or first

    def to_info(self) -> dict[str, Any]:
        settings = self.connect_settings
        info: dict[str, Any] = {
            "uuid": self.uuid,
            "status": self.status,
            "previous_status": self.previous_status,
            "add_time": local_time(self.add_time),
            "start_time": local_time(self.start_time),
            "modify_time": local_time(self.modify_time or self.add_time),
            "end_time": local_time(self.end_time),
            "bytes_expected": self.bytes_expected,
            "bytes_written": self.bytes_written,
            "percentage": round(self.percentage, 6),
            "calculated_rate_kbps": self.rate_kbps,
            "elapsed_usec": self.elapsed_usec,
            "remaining_usec": self.remaining_usec,
            "current_file": self.current_file,
            "explorer_path": self.explorer_path,
            "file_counts": self.file_counts(),
            "title": self.title,
            "transfer_iteration_token": self.token,
            "transfer_spec": self.public_spec(with_paths=settings.get("return_paths", True)),
            "aspera_connect_settings": dict(settings),
            "transport": self.transport,
        }
        if settings.get("return_files", True):
            info["files"] = list(self.files.values())
        if self.error:
            info["error_code"] = self.error.get("code", 1)
            info["error_desc"] = self.error.get("user_message", "")
        return info

    def file_counts(self) -> dict[str, int]:
        return {
            "attempted": self.files_done + self.files_skipped + self.files_failed,
            "completed": self.files_done + self.files_skipped,
            "failed": self.files_failed,
            "skipped": self.files_skipped,
        }

    def reset_progress(self) -> None:
        """A new attempt reports its own counters (the engine starts from zero)."""
        self.bytes_written = 0
        self.rate_kbps = 0.0
        self.files_done = self.files_skipped = self.files_failed = 0
