"""The file, folder and save dialogs the SDK asks for, native or headless.

With a display, a real Tk dialog (in a child process, see :mod:`tkdialog`) asks the user.
Without one, a configured policy answers: files of the ``headless_folder`` for the file
dialog, that folder for the folder dialog, a name in it for the save dialog; with no such
folder every dialog is "cancelled" (an empty selection). Everything chosen is granted to
the asking page's ``app_id``.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import os
import sys
import time
from pathlib import Path
from typing import Any

from slipstream.agent.config import AgentConfig

DIALOG_TIMEOUT = 3600.0


def describe(path: str, *, exists: bool = True) -> dict[str, Any]:
    """One entry of a ``dataTransfer.files`` list, as Connect reports it."""
    try:
        st = os.stat(path) if exists else None
    except OSError:
        st = None
    folder = st is not None and os.path.isdir(path)
    kind = "inode/directory" if folder else (mimetypes.guess_type(path)[0] or "")
    return {
        "lastModifiedDate": time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(st.st_mtime))
        if st
        else "",
        "name": path,
        "size": 0 if st is None or folder else st.st_size,
        "type": kind,
    }


def _matches(name: str, filters: object) -> bool:
    if not isinstance(filters, list) or not filters:
        return True
    for item in filters:
        exts = [str(e).lower().lstrip(".") for e in (item or {}).get("extensions") or ["*"]]
        if "*" in exts or name.lower().rsplit(".", 1)[-1] in exts:
            return True
    return False


class Dialogs:
    def __init__(self, config: AgentConfig) -> None:
        self._config = config
        self._lock = asyncio.Lock()  # one dialog on screen at a time

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            if self._config.uses_tk():
                return await _run_tk(request)
            return self._headless(request)

    async def pick(self, request: dict[str, Any]) -> list[str]:
        answer = await self.ask(request)
        return [os.path.abspath(p) for p in answer.get("paths") or []]

    def _headless(self, request: dict[str, Any]) -> dict[str, Any]:
        folder = self._config.headless_folder
        kind = request.get("kind")
        if folder is None or not folder.is_dir():
            return {"paths": [], "ok": False, "text": None}
        if kind == "open-file":
            names = sorted(p for p in os.listdir(folder) if (folder / p).is_file())
            paths = [str(folder / n) for n in names if _matches(n, request.get("filters"))]
            return {"paths": paths if request.get("multiple", True) else paths[:1]}
        if kind == "open-folder":
            return {"paths": [str(folder)]}
        if kind == "save":
            name = Path(str(request.get("suggested") or "download")).name
            return {"paths": [str(folder / name)]}
        return {"paths": [], "ok": kind == "confirm", "text": None}


async def _run_tk(request: dict[str, Any]) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "slipstream.agent.tkdialog",
        json.dumps(request),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), DIALOG_TIMEOUT)
    except (TimeoutError, asyncio.CancelledError):
        process.kill()
        await process.wait()
        raise
    lines = out.decode(errors="replace").strip().splitlines()
    if process.returncode != 0 or not lines:
        return {"paths": [], "error": err.decode(errors="replace")[-500:]}
    answer: dict[str, Any] = json.loads(lines[-1])
    return answer
