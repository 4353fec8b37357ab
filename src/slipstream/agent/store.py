"""The agent's SQLite history: every transfer, the iteration token, and the user's picks.

One connection, used only from the agent's event loop. Each transfer is one row holding
its state as JSON; its secrets (the page's password, token, passphrase) are never written in
clear, only sealed by :mod:`vault` (the file is private to the user all the same). The
iteration token is a counter in ``meta``; it only grows, across restarts, as the Connect
documentation promises.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slipstream.agent.vault import Vault

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS transfers (
    uuid TEXT PRIMARY KEY,
    app_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    token INTEGER NOT NULL,
    status TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transfers_app ON transfers (app_id, token);
CREATE TABLE IF NOT EXISTS grants (
    app_id TEXT NOT NULL,
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    PRIMARY KEY (app_id, path, kind)
);
"""


class AgentStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.exists()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        if fresh:
            os.chmod(path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Deleted and overwritten content is zeroed, not left in free pages.
        self._db.execute("PRAGMA secure_delete=ON")
        self._vault = Vault(path.with_name(path.stem + ".key"))
        self._db.executescript(_SCHEMA)
        self._token = self._meta("iteration_token")
        self._seq = self._meta("seq")

    def close(self) -> None:
        self._db.close()

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # --- the iteration token ---------------------------------------------------------

    @property
    def token(self) -> int:
        return self._token

    def next_token(self) -> int:
        self._token += 1
        self._set_meta("iteration_token", self._token)
        return self._token

    def next_seq(self) -> int:
        self._seq += 1
        self._set_meta("seq", self._seq)
        return self._seq

    # --- transfers -------------------------------------------------------------------

    def save(self, data: dict[str, Any]) -> None:
        """Store one transfer; its ``secrets`` are sealed, never written in clear."""
        data = dict(data)
        data["sealed"] = self._vault.seal(data["uuid"], data.pop("secrets", None) or {})
        self._db.execute(
            "INSERT INTO transfers (uuid, app_id, seq, token, status, data) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(uuid) DO UPDATE SET "
            "token = excluded.token, status = excluded.status, data = excluded.data",
            (
                data["uuid"],
                data["app_id"],
                data["seq"],
                data["token"],
                data["status"],
                json.dumps(data, separators=(",", ":")),
            ),
        )

    def load_all(self) -> Iterator[dict[str, Any]]:
        rows = self._db.execute("SELECT data FROM transfers ORDER BY seq").fetchall()
        for (text,) in rows:
            data = json.loads(text)
            data["secrets"] = self._vault.unseal(data["uuid"], data.pop("sealed", None))
            yield data

    def compact(self) -> None:
        """Rewrite the file and empty the write-ahead log (after clear secrets were removed)."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.execute("VACUUM")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # --- paths the user picked or dropped, per app_id ------------------------------------

    def add_grant(self, app_id: str, path: str, kind: str) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO grants (app_id, path, kind) VALUES (?, ?, ?)",
            (app_id, path, kind),
        )

    def grants(self, app_id: str) -> list[tuple[str, str]]:
        rows = self._db.execute("SELECT path, kind FROM grants WHERE app_id = ?", (app_id,))
        return [(str(path), str(kind)) for path, kind in rows]
