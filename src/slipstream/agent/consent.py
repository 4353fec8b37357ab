"""What a web page may touch on this computer.

A page may upload only what the user picked in one of the agent's dialogs or dropped on a
drop target (or what lies in a folder the administrator trusted); the grant belongs to
that page's ``app_id``. Downloads land in the download folder; an absolute destination
(``use_absolute_destination_path``) must itself have been picked in a folder or save
dialog. Paths are compared after resolving links, so ``..`` and symlinks cannot widen a
grant.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from slipstream.agent.config import AgentConfig
from slipstream.agent.errors import UnauthorizedPath
from slipstream.agent.store import AgentStore
from slipstream.errors import DocrootViolation
from slipstream.spec import ConnectSpec, TransferSpec

READ_KINDS = ("file", "folder", "drop")
WRITE_KINDS = ("folder", "save")


def real(path: str | Path) -> str:
    return os.path.realpath(os.path.expanduser(str(path)))


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class Consent:
    def __init__(self, store: AgentStore, config: AgentConfig) -> None:
        self._store = store
        self._config = config
        self._cache: dict[str, list[tuple[str, str]]] = {}

    def grant(self, app_id: str, path: str, kind: str) -> None:
        entry = (real(path), kind)
        grants = self._grants(app_id)
        if entry not in grants:
            grants.append(entry)
            self._store.add_grant(app_id, *entry)

    def _grants(self, app_id: str) -> list[tuple[str, str]]:
        if app_id not in self._cache:
            self._cache[app_id] = self._store.grants(app_id)
        return self._cache[app_id]

    def picked_folders(self, app_id: str) -> list[str]:
        """Folders this page's user picked, and those holding the files they picked."""
        folders = []
        for path, kind in self._grants(app_id):
            folders.append(path if kind == "folder" else os.path.dirname(path))
        return folders

    def _trusted(self) -> list[str]:
        return [real(folder) for folder in self._config.trusted_folders]

    def may_read(self, app_id: str, path: str) -> bool:
        target = real(path)
        if any(_inside(root, target) for root in self._trusted()):
            return True
        for granted, kind in self._grants(app_id):
            if kind in READ_KINDS and (
                target == granted or (kind == "folder" and _inside(granted, target))
            ):
                return True
        return False

    def may_write(self, app_id: str, path: str) -> bool:
        target = real(path)
        roots = [real(self._config.download_dir), *self._trusted()]
        if any(_inside(root, target) for root in roots):
            return True
        return any(
            kind in WRITE_KINDS and _inside(granted, target)
            for granted, kind in self._grants(app_id)
        )

    def require_read(self, app_id: str, path: str) -> str:
        if not os.path.isabs(os.path.expanduser(path)) or not self.may_read(app_id, path):
            raise UnauthorizedPath(
                f"{path!r} was not selected by the user: pick it in a file or folder dialog "
                "or drop it on the page first",
            )
        return real(path)

    # --- transfer specs ----------------------------------------------------------------

    def upload_sources(self, app_id: str, spec: TransferSpec) -> list[str]:
        """Every local source of an upload, checked; raises before anything is sent."""
        root = spec.source_root or ""
        sources = []
        for pair in spec.path_pairs():
            joined = os.path.join(root, pair.source) if root else pair.source
            sources.append(self.require_read(app_id, joined))
        return sources

    def download_target(self, app_id: str, spec: TransferSpec, connect: ConnectSpec) -> str:
        """Where a download lands (an absolute folder or file name), checked."""
        given = spec.destination_root or "/"
        if connect.use_absolute_destination_path:
            if not os.path.isabs(given) or not self.may_write(app_id, given):
                raise UnauthorizedPath(
                    f"Destination {given!r} was not chosen by the user: pick it in a folder "
                    "or save dialog first",
                )
            return real(given)
        parts = [p for p in PurePosixPath(given.replace("\\", "/")).parts if p not in ("/", ".")]
        if ".." in parts:
            raise DocrootViolation(f"Destination {given!r} leaves the download folder")
        base = self._config.download_dir
        base.mkdir(parents=True, exist_ok=True)
        target = base.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        return str(target)

    def upload_archive(self, app_id: str, spec: TransferSpec, sources: list[str]) -> str:
        """Where ``move_after_transfer`` moves an upload's sources: a folder the page may
        write to. A relative one is taken from the source root (or the first source's
        folder), never from the agent's own working folder."""
        given = os.path.expanduser(spec.move_after_transfer or "")
        base = spec.source_root or (os.path.dirname(sources[0]) if sources else "")
        target = real(given if os.path.isabs(given) else os.path.join(base, given))
        if not os.path.isabs(target) or not self.may_write(app_id, target):
            raise UnauthorizedPath(
                f"move_after_transfer {spec.move_after_transfer!r} is not a folder the user "
                "chose: pick it (or a folder holding it) in a folder dialog first",
            )
        return target

    def check_mirror(self, app_id: str, target: str, connect: ConnectSpec) -> None:
        """``delete_before_transfer`` deletes local files: never across the whole download
        folder (or a trusted one), only below it or in a folder the user picked."""
        roots = {real(self._config.download_dir), *self._trusted()}
        if not connect.use_absolute_destination_path and real(target) in roots:
            raise UnauthorizedPath(
                "delete_before_transfer would delete files in the download folder itself: "
                "give a destination_root below it, or a folder the user picked",
            )


def prepare_spec(
    consent: Consent, app_id: str, spec: TransferSpec, connect: ConnectSpec
) -> tuple[dict[str, Any], str, list[str]]:
    """The spec the engine runs (local paths made absolute), the explorer path, and an
    upload's local sources. Raises before anything is queued."""
    body = spec.to_json_dict()
    if spec.direction == "send":
        sources = consent.upload_sources(app_id, spec)
        if spec.move_after_transfer:
            body["move_after_transfer"] = consent.upload_archive(app_id, spec, sources)
        return body, sources[0] if sources else "", sources
    target = consent.download_target(app_id, spec, connect)
    if spec.delete_before_transfer:
        consent.check_mirror(app_id, target, connect)
    body["destination_root"] = target
    return body, target, []


def scan_size(paths: list[str], limit: int = 200_000) -> int:
    """Total bytes below ``paths`` (stops counting after ``limit`` entries)."""
    total, seen = 0, 0
    for path in paths:
        if os.path.isfile(path):
            total += os.path.getsize(path)
            continue
        for folder, _dirs, files in os.walk(path):
            for name in files:
                seen += 1
                if seen > limit:
                    return total
                try:
                    total += os.path.getsize(os.path.join(folder, name))
                except OSError:
                    continue
    return total
