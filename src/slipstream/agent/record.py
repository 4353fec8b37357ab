"""One transfer as the agent keeps it, and its Connect ``TransferInfo`` view.

The record is plain data (saved as JSON in the store). Its ``spec`` holds no secret: those
live in ``secrets`` (sealed by the store, merged back only in :meth:`engine_spec`). Engine
events are folded into it by :meth:`TransferRecord.apply_event`; :meth:`to_info` renders
what the SDK reads, honouring the page's ``return_paths`` / ``return_files``.
"""

from __future__ import annotations

import re
import time
import uuid as uuidlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import PurePath
from typing import Any
from urllib.parse import urlsplit

from slipstream.spec import TRANSFER_STATUS

SECRET_FIELDS = (
    "remote_password",
    "token",
    "content_protection_passphrase",
    "ssh_private_key",
    "ssh_private_key_passphrase",
    "password",
)
# Keys that make a nested object (fasp_proxy, icos, ...) a secret as a whole.
_SECRET_KEY = re.compile(r"pass|secret|token|private_key|api_key", re.IGNORECASE)
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
# Engine event field -> the name it has in a TransferInfo ``files`` entry (beyond Connect's
# bytes_expected / bytes_written / fasp_file_id / file, which Connect has no place for).
FILE_DETAILS = {
    "file_checksum": "checksum",
    "file_checksum_type": "checksum_type",
    "stored_path": "stored_path",  # obfuscate_file_names, or the .aspera-env name
    "saved_as": "saved_as",  # save_before_overwrite
    "resumed_from": "resumed_from",
}
FILE_STATUS = {"file_done": "completed", "file_skipped": "skipped", "file_error": "failed"}
SOURCE_ACTION = {"source_removed": "removed", "source_moved": "moved", "source_kept": "kept"}


def local_time(epoch: float | None) -> str:
    """Connect's time format: local ISO text without zone, ``""`` when not yet."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(epoch)) if epoch else ""


def is_secret(name: str, value: object) -> bool:
    """Whether a spec field must never be shown to a page nor stored in clear."""
    if name in SECRET_FIELDS:
        return True
    if isinstance(value, dict) and name != "tags":
        return any(_SECRET_KEY.search(str(key)) for key in value)
    if name.endswith("proxy") and isinstance(value, str):
        try:
            return urlsplit(value).password is not None  # dnat://user:PASSWORD@host
        except ValueError:
            return True
    return False


def split_secrets(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(spec without secrets, the secrets)``."""
    public: dict[str, Any] = {}
    hidden: dict[str, Any] = {}
    for name, value in spec.items():
        (hidden if is_secret(name, value) else public)[name] = value
    return public, hidden


@dataclass
class TransferRecord:
    uuid: str
    app_id: str
    seq: int
    spec: dict[str, Any]  # the effective spec given to the engine, without its secrets
    connect_settings: dict[str, Any]
    secrets: dict[str, Any] = field(default_factory=dict)  # sealed by the store
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
    files_excluded: int = 0
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
        record = cls(**{key: value for key, value in data.items() if key in known})
        # Rows written before secrets were sealed hold them in the spec: move them.
        record.spec, legacy = split_secrets(record.spec)
        record.secrets = {**legacy, **record.secrets}
        return record

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
        kind = str(event.get("type"))
        if kind == "progress":
            self._on_progress(event)
        elif kind in FILE_STATUS:
            self._on_file(kind, event)
        elif kind == "file_excluded":
            self.files_excluded += 1
        elif kind in SOURCE_ACTION:
            self._on_source(kind, event)
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
        size = int(event.get("size") or 0)
        if kind == "file_done":
            self.files_done += 1
        elif kind == "file_skipped":
            self.files_skipped += 1
        else:
            self.files_failed += 1
        entry = self._file_entry(event)
        for stale in ("skip_reason", "error_code", "error_desc"):  # from an earlier attempt
            entry.pop(stale, None)
        self.current_file = entry["file"]
        entry.update(
            bytes_expected=size,
            bytes_written=size if kind == "file_done" else 0,
            status=FILE_STATUS[kind],
        )
        for source, name in FILE_DETAILS.items():
            if event.get(source) is not None:
                entry[name] = event[source]
        if kind == "file_skipped" and event.get("reason"):
            entry["skip_reason"] = str(event["reason"])
        error = event.get("error")
        if kind == "file_error" and isinstance(error, dict):
            entry["error_code"] = error.get("code", 1)
            entry["error_desc"] = str(error.get("user_message") or "")

    def _on_source(self, kind: str, event: dict[str, Any]) -> None:
        """remove_after_transfer / move_after_transfer: what became of the source file."""
        entry = self._file_entry(event)
        entry["source_action"] = SOURCE_ACTION[kind]
        if event.get("to"):
            entry["source_moved_to"] = str(event["to"])
        if event.get("reason"):
            entry["source_kept_reason"] = str(event["reason"])

    def _file_entry(self, event: dict[str, Any]) -> dict[str, Any]:
        """The ``files`` entry of an event's file, keyed by its path in the transfer."""
        key = str(event.get("path") or event.get("file") or "")
        entry = self.files.get(key)
        if entry is None:
            entry = self.files[key] = {
                "bytes_expected": int(event.get("size") or 0),
                "bytes_written": 0,
                "fasp_file_id": str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"{self.uuid}/{key}")),
                "file": key,
            }
            if len(self.files) > MAX_FILES_KEPT:
                self.files.pop(next(iter(self.files)))
        if event.get("file"):  # a download's local path: what Connect shows
            entry["file"] = str(event["file"])
        return entry

    # --- the engine's spec -------------------------------------------------------------

    def engine_spec(self) -> dict[str, Any]:
        """The spec the engine runs: secrets merged back, and this transfer's uuid in
        ``tags.aspera.xfer_id`` unless the page brought one (the server's setup API puts its
        own there), so the server's record of the transfer carries the agent's id."""
        spec = {**self.spec, **self.secrets}
        if spec.get("tags64"):
            return spec  # the page's base64 tags win; adding ``tags`` would hide them
        tags = dict(spec.get("tags") or {})
        aspera = tags.get("aspera")
        aspera = dict(aspera) if isinstance(aspera, dict) else {}
        aspera.setdefault("xfer_id", self.uuid)
        spec["tags"] = {**tags, "aspera": aspera}
        return spec

    # --- the Connect view ------------------------------------------------------------

    def public_spec(self, *, with_paths: bool = True) -> dict[str, Any]:
        """The transfer spec as pages see it: secrets removed, Connect's tags added."""
        spec, _hidden = split_secrets(self.spec)  # none there; a second line of defence
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
            "excluded": self.files_excluded,  # beyond Connect: left out by filters
        }

    def reset_progress(self) -> None:
        """A new attempt reports its own counters (the engine starts from zero)."""
        self.bytes_written = 0
        self.rate_kbps = 0.0
        self.files_done = self.files_skipped = self.files_failed = self.files_excluded = 0
