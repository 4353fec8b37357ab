"""The server's record of every transfer (``/ops/transfers``), in memory and in SQLite.

One record per transfer (``id`` = ``tags.aspera.xfer_id`` when the client sends one, as the
Node API does, else a fresh UUID). A transfer can take several sessions: a retry, or the
HTTPS fallback after UDP was blocked, continues the same record and appends a session,
so the record tells what really happened ("fasp failed: UDP blocked, then http completed").

Every change bumps a global sequence number; ``GET /ops/transfers?iteration_token=N``
returns what changed after N, in change order, which serves both paging and polling.

Active records live in memory and are written to ``state_dir/ops.sqlite`` when they start
and end (and before every listing), not on each file: a session of many small files must
not pay a disk write per file.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slipstream.errors import SlipstreamError
from slipstream.spec import TransferSpec

log = logging.getLogger("slipstream.server")

MAX_FILES_PER_RECORD = 1000  # the newest files; the counts stay exact
SECRET_FIELDS = frozenset(
    {
        "remote_password",
        "token",
        "ssh_private_key",
        "ssh_private_key_passphrase",
        "content_protection_passphrase",
        "password",
    }
)
_XFER_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def public_spec(spec: TransferSpec) -> dict[str, Any]:
    """The spec as recorded: never a password, key or token."""
    return {k: v for k, v in spec.to_json_dict().items() if k not in SECRET_FIELDS}


def xfer_id_of(spec: TransferSpec) -> str | None:
    tags = spec.tags or {}
    aspera = tags.get("aspera") if isinstance(tags, dict) else None
    value = aspera.get("xfer_id") if isinstance(aspera, dict) else None
    return value if isinstance(value, str) and _XFER_ID.match(value) else None


@dataclass
class SessionEntry:
    transport: str
    peer: str
    status: str = "running"
    start_time: str = field(default_factory=now_iso)
    end_time: str | None = None
    bytes_transferred: int = 0
    error: dict[str, Any] | None = None


@dataclass
class TransferRecord:
    id: str
    user: str
    direction: str  # the client's direction: send = upload to this server
    initiator: str  # "client" (a peer connected to us) or "server" (POST /ops/transfers)
    peer: str
    spec: dict[str, Any]
    status: str = "running"
    transport: str = "fasp"
    start_time: str = field(default_factory=now_iso)
    end_time: str | None = None
    files: list[dict[str, Any]] = field(default_factory=list)
    file_counts: dict[str, int] = field(
        default_factory=lambda: {"completed": 0, "skipped": 0, "failed": 0}
    )
    bytes_transferred: int = 0
    elapsed_s: float = 0.0
    rate_bps: float = 0.0
    errors: list[dict[str, Any]] = field(default_factory=list)
    sessions: list[SessionEntry] = field(default_factory=list)
    seq: int = 0
    _started: float = field(default_factory=time.monotonic, repr=False)

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body.pop("_started", None)
        body["cookie"] = self.spec.get("cookie")
        body["tags"] = self.spec.get("tags")
        body["title"] = self.spec.get("title")
        body["kind"] = "upload" if self.direction == "send" else "download"
        if self.initiator == "server":
            body["kind"] = "upload" if self.direction == "receive" else "download"
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> TransferRecord:
        known = {k: v for k, v in body.items() if k in cls.__dataclass_fields__}
        known["sessions"] = [SessionEntry(**s) for s in body.get("sessions", [])]
        return cls(**known)


class Tracked:
    """One session of a record, as the code running that session sees it."""

    def __init__(self, store: OpsStore, record: TransferRecord, session: SessionEntry) -> None:
        self.store = store
        self.record = record
        self.session = session

    @property
    def id(self) -> str:
        return self.record.id

    def file_event(self, event: dict[str, Any]) -> None:
        self.store.file_event(self, event)

    def finish(self, error: SlipstreamError | None = None) -> None:
        self.store.finish(self, error)


class OpsStore:
    """Transfer records: the active ones in memory, all of them in SQLite."""

    def __init__(self, path: Path | None) -> None:
        self._db: sqlite3.Connection | None = None
        self._seq = 0
        self._active: dict[str, TransferRecord] = {}
        self._dirty: set[str] = set()
        self._memory: dict[str, TransferRecord] = {}  # used only without a database
        if path is not None:
            self._open(path)

    def _open(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS transfers (id TEXT PRIMARY KEY, "
            "user TEXT NOT NULL, status TEXT NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS transfers_seq ON transfers(seq)")
        row = self._db.execute("SELECT MAX(seq) FROM transfers").fetchone()
        self._seq = int(row[0] or 0)
        self._close_orphans()

    def _close_orphans(self) -> None:
        # Records left "running" by a server that stopped can never finish now.
        assert self._db is not None
        rows = self._db.execute("SELECT data FROM transfers WHERE status = 'running'")
        for (data,) in rows.fetchall():
            record = TransferRecord.from_json(json.loads(data))
            record.status = "failed"
            record.errors.append({"code": 16, "user_message": "The server stopped"})
            for entry in record.sessions:
                if entry.status == "running":
                    entry.status = "failed"
            self._changed(record, write=True)

    def close(self) -> None:
        self.flush()
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- life of a record ---------------------------------------------------------------

    def start(
        self,
        *,
        user: str,
        peer: str,
        spec: TransferSpec,
        transport: str,
        initiator: str = "client",
        xfer_id: str | None = None,
    ) -> Tracked:
        """A new session; it continues the record ``xfer_id`` names when that is the same
        user's (a retry or a fallback), and starts a new record otherwise."""
        xfer_id = xfer_id or xfer_id_of(spec)
        found = self._find(xfer_id) if xfer_id else None
        record = found if found is not None and found.user == user else None
        if record is None:
            record = TransferRecord(
                id=xfer_id if xfer_id and found is None else str(uuid.uuid4()),
                user=user,
                direction=spec.direction,
                initiator=initiator,
                peer=peer,
                spec=public_spec(spec),
            )
        session = SessionEntry(transport=transport, peer=peer)
        record.sessions.append(session)
        self._follow_newest(record)
        self._active[record.id] = record
        self._changed(record, write=True)
        return Tracked(self, record, session)

    def file_event(self, tracked: Tracked, event: dict[str, Any]) -> None:
        kind = str(event.get("type"))
        status = _FILE_STATUS.get(kind)
        if status is None:
            return
        record = tracked.record
        entry: dict[str, Any] = {"path": event.get("path"), "status": status}
        if event.get("size") is not None:
            entry["size"] = event.get("size")
        if kind == "file_done":
            size = int(event.get("size") or 0)
            record.bytes_transferred += size
            tracked.session.bytes_transferred += size
            entry["digest"] = event.get("digest")
        elif kind == "file_error":
            entry["error"] = event.get("error")
            if len(record.errors) < MAX_FILES_PER_RECORD:
                record.errors.append({"path": event.get("path"), **(event.get("error") or {})})
        else:
            entry["reason"] = event.get("reason")
        record.file_counts[status] += 1
        record.files.append(entry)
        del record.files[:-MAX_FILES_PER_RECORD]
        self._changed(record)

    def finish(self, tracked: Tracked, error: SlipstreamError | None = None) -> None:
        """End one session: completed, partially completed (some files failed) or failed."""
        record, session = tracked.record, tracked.session
        if session.status != "running":
            return
        if error is not None:
            session.status = "failed"
            session.error = error.to_dict()
            record.errors.append(error.to_dict())
        else:
            failed = record.file_counts["failed"]
            session.status = "partially_completed" if failed else "completed"
        session.end_time = now_iso()
        record.elapsed_s = round(time.monotonic() - record._started, 3)
        record.rate_bps = record.bytes_transferred * 8 / max(record.elapsed_s, 1e-3)
        self._follow_newest(record)
        if all(s.status != "running" for s in record.sessions):
            self._active.pop(record.id, None)
        self._changed(record, write=True)

    @staticmethod
    def _follow_newest(record: TransferRecord) -> None:
        # The record's status is its newest session's: the UDP session that failed (UDP
        # blocked) may end after the HTTPS fallback that replaced it has started.
        newest = record.sessions[-1]
        record.status = newest.status
        record.transport = newest.transport
        record.end_time = newest.end_time

    # --- queries --------------------------------------------------------------------------

    def get(self, record_id: str) -> TransferRecord | None:
        return self._find(record_id)

    def list(
        self, *, after: int = 0, count: int = 100, user: str | None = None
    ) -> tuple[list[TransferRecord], int, bool]:
        """Up to ``count`` records changed after ``after`` (oldest change first), the
        iteration token for the next call, and whether more are waiting."""
        self.flush()
        if self._db is None:
            matching = sorted(
                (r for r in self._memory.values() if r.seq > after and user in (None, r.user)),
                key=lambda r: r.seq,
            )
            page = matching[:count]
            more = len(matching) > count
        else:
            query = "SELECT data FROM transfers WHERE seq > ?"
            args: list[Any] = [after]
            if user is not None:
                query += " AND user = ?"
                args.append(user)
            rows = self._db.execute(query + " ORDER BY seq LIMIT ?", [*args, count + 1])
            loaded = [TransferRecord.from_json(json.loads(d)) for (d,) in rows.fetchall()]
            more = len(loaded) > count
            page = [self._active.get(r.id, r) for r in loaded[:count]]
        return page, page[-1].seq if page else after, more

    def flush(self) -> None:
        for record_id in list(self._dirty):
            record = self._active.get(record_id) or self._memory.get(record_id)
            if record is not None:
                self._write(record)
        self._dirty.clear()

    # --- storage ----------------------------------------------------------------------------

    def _changed(self, record: TransferRecord, *, write: bool = False) -> None:
        self._seq += 1
        record.seq = self._seq
        if write:
            self._write(record)
            self._dirty.discard(record.id)
        else:
            self._dirty.add(record.id)

    def _write(self, record: TransferRecord) -> None:
        if self._db is None:
            self._memory[record.id] = record
            return
        data = json.dumps(record.to_json(), default=str)
        try:
            self._db.execute(
                "INSERT INTO transfers (id, user, status, seq, data) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET status = excluded.status, seq = excluded.seq, "
                "data = excluded.data",
                (record.id, record.user, record.status, record.seq, data),
            )
        except sqlite3.Error as exc:
            # The transfer itself must not fail because its bookkeeping could not be saved.
            log.warning("cannot save transfer record %s: %s", record.id, exc)

    def _find(self, record_id: str) -> TransferRecord | None:
        if record_id in self._active:
            return self._active[record_id]
        if self._db is None:
            return self._memory.get(record_id)
        row = self._db.execute("SELECT data FROM transfers WHERE id = ?", (record_id,)).fetchone()
        return TransferRecord.from_json(json.loads(row[0])) if row is not None else None


_FILE_STATUS = {"file_done": "completed", "file_skipped": "skipped", "file_error": "failed"}
