"""The file endpoints: checksums, reading (for previews) and dropped files.

All of them work only on paths the asking page was granted (see :mod:`consent`).
Browsers tell a page only the *names* of dropped files, never their folders, so a drop is
matched by name and size (and time when the browser sends it) against a few folders: the
configured drop folders, the page's earlier picks, and, with a display, the usual desktop
folders; with a display the user also confirms the match in a native dialog.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import mimetypes
import os
from pathlib import Path
from typing import Any

from slipstream.agent.config import AgentConfig
from slipstream.agent.consent import Consent
from slipstream.agent.dialogs import Dialogs, describe
from slipstream.errors import SourceNotFound, UsageError

CHECKSUM_METHODS = ("md5", "sha1", "sha256", "sha512")
READ_CHUNK = 1 << 20


def _int_field(body: dict[str, Any], name: str, default: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise UsageError(f"{name} must be a non-negative integer (got {value!r})")
    return int(value)


def _read(path: str, offset: int, length: int | None) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read() if length is None else handle.read(length)
    except FileNotFoundError:
        raise SourceNotFound(f"{path!r} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{path!r} is a folder") from None


def _digest(path: str, method: str, offset: int, length: int) -> str:
    hasher = hashlib.new(method)
    left = length or None
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            while left is None or left > 0:
                block = handle.read(READ_CHUNK if left is None else min(READ_CHUNK, left))
                if not block:
                    break
                hasher.update(block)
                if left is not None:
                    left -= len(block)
    except FileNotFoundError:
        raise SourceNotFound(f"{path!r} does not exist") from None
    return hasher.hexdigest()


class FileService:
    def __init__(self, config: AgentConfig, consent: Consent, dialogs: Dialogs) -> None:
        self._config = config
        self._consent = consent
        self._dialogs = dialogs

    async def checksum(self, app_id: str, body: dict[str, Any]) -> dict[str, Any]:
        path = self._consent.require_read(app_id, str(body.get("path") or ""))
        method = str(body.get("checksumMethod") or "md5").lower()
        if method not in CHECKSUM_METHODS:
            raise UsageError(f"checksumMethod must be one of {', '.join(CHECKSUM_METHODS)}")
        offset = _int_field(body, "offset", 0)
        length = _int_field(body, "chunkSize", 0)
        digest = await asyncio.to_thread(_digest, path, method, offset, length)
        return {"checksumMethod": method, "checksum": digest}

    async def read(self, app_id: str, body: dict[str, Any], *, chunk: bool) -> dict[str, Any]:
        path = self._consent.require_read(app_id, str(body.get("path") or ""))
        offset = _int_field(body, "offset", 0) if chunk else 0
        length = _int_field(body, "chunkSize", 0) if chunk else None
        limit = self._config.read_limit
        if (length is None and os.path.getsize(path) > limit) or (length or 0) > limit:
            raise UsageError(f"Reads are limited to {limit} bytes; read it in chunks")
        data = await asyncio.to_thread(_read, path, offset, length)
        return {
            "type": mimetypes.guess_type(path)[0] or "application/octet-stream",
            "data": base64.b64encode(data).decode("ascii"),
        }

    # --- drag and drop ---------------------------------------------------------------

    async def dropped(self, app_id: str, body: dict[str, Any]) -> dict[str, Any]:
        files = ((body.get("dataTransfer") or {}).get("files")) or []
        found: list[tuple[dict[str, Any], str | None]] = [
            (item, self._locate(app_id, item)) for item in files if isinstance(item, dict)
        ]
        matched = [path for _item, path in found if path]
        if matched and self._config.uses_tk() and not await self._confirm(matched):
            found = [(item, None) for item, _path in found]
        result = []
        for item, path in found:
            if path is None:
                result.append(item)  # left as the browser named it: not granted
                continue
            self._consent.grant(app_id, path, "drop")
            result.append(describe(path))
        return {"dataTransfer": {"files": result}}

    def _search_folders(self, app_id: str) -> list[Path]:
        folders = list(self._config.drop_folders)
        if self._config.headless_folder is not None:
            folders.append(self._config.headless_folder)
        folders += [Path(p) for p in self._consent.picked_folders(app_id)]
        if self._config.uses_tk():
            home = Path.home()
            folders += [home / "Desktop", home / "Downloads", home / "Documents", home]
        return list(dict.fromkeys(folders))

    def _locate(self, app_id: str, item: dict[str, Any]) -> str | None:
        name = Path(str(item.get("name") or "")).name
        if not name or name in (".", ".."):
            return None
        hits = []
        for folder in self._search_folders(app_id):
            candidate = folder / name
            try:
                st = candidate.stat()
            except OSError:
                continue
            size = item.get("size")
            if candidate.is_file() and (size is None or int(size) == st.st_size):
                hits.append(str(candidate.resolve()))
        unique = list(dict.fromkeys(hits))
        return unique[0] if len(unique) == 1 else None

    async def _confirm(self, paths: list[str]) -> bool:
        listing = "\n".join(paths[:20])
        prompt = f"A web page asks to use the files you dropped:\n\n{listing}\n\nAllow?"
        answer = await self._dialogs.ask(
            {"kind": "confirm", "title": "Slipstream", "prompt": prompt}
        )
        return bool(answer.get("ok"))
