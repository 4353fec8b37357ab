"""What happens to files around a transfer, besides copying them.

* Source disposition after success (sending side): ``remove_after_transfer`` deletes a source
  file once the receiver confirmed it, ``move_after_transfer`` moves it into an archive
  folder (inside the docroot on a server), ``remove_empty_directories`` then removes source
  folders left empty. A source that changed since it was read is never touched.
* ``save_before_overwrite`` (receiving side): the file about to be replaced is renamed to
  ``name.YYYY.MM.DD.hh.mm.ss.N.ext`` first.
* ``delete_before_transfer`` (receiving side): mirror deletions, see :class:`MirrorTracker`.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from slipstream.engine.paths import SourceEntry, resolve_in_docroot, safe_relative
from slipstream.engine.resume import CKPT_SUFFIX
from slipstream.errors import PathError, SlipstreamError

log = logging.getLogger("slipstream.engine")

Emit = Callable[[dict[str, object]], None]


# --- source disposition -----------------------------------------------------------------------


def unchanged_since_read(entry: SourceEntry) -> bool:
    """Whether the source still is the version that was sent (size and mtime)."""
    try:
        st = os.stat(entry.local_path)
    except OSError:
        return False
    return st.st_size == entry.size and st.st_mtime_ns == entry.mtime_ns


@dataclass
class SourceDisposer:
    """Removes or archives sources after the receiver confirmed them."""

    remove: bool = False
    archive: Path | None = None  # move_after_transfer, resolved (and confined) already
    remove_empty_dirs: bool = False
    remove_top_dirs: bool = False  # remove_empty_source_directory
    remove_skipped: bool = False
    _dirs: list[Path] = field(default_factory=list)
    _top_dirs: set[Path] = field(default_factory=set)
    _seen_dirs: set[Path] = field(default_factory=set)

    @property
    def active(self) -> bool:
        return self.remove or self.archive is not None

    def note_dir(self, entry: SourceEntry) -> None:
        """Remember a source folder (folders come before their contents)."""
        if not (self.remove_empty_dirs and self.active):
            return
        if entry.local_path.parent not in self._seen_dirs:
            self._top_dirs.add(entry.local_path)
        self._seen_dirs.add(entry.local_path)
        self._dirs.append(entry.local_path)

    def file_done(self, entry: SourceEntry, emit: Emit, *, skipped: bool = False) -> None:
        """Dispose of one confirmed (or, with remove_skipped, skipped) source file."""
        if not self.active or (skipped and not self.remove_skipped):
            return
        if not unchanged_since_read(entry):
            emit(_kept(entry, "the source changed after it was read; left in place"))
            return
        try:
            if self.archive is not None:
                target = self._archive_target(entry)
                emit({"type": "source_moved", "path": entry.rel_path, "to": str(target)})
            else:
                os.unlink(entry.local_path)
                emit({"type": "source_removed", "path": entry.rel_path})
        except (OSError, SlipstreamError) as exc:
            emit(_kept(entry, getattr(exc, "user_message", None) or str(exc)))

    def _archive_target(self, entry: SourceEntry) -> Path:
        assert self.archive is not None
        target = self.archive / safe_relative(entry.rel_path)
        if os.path.lexists(target):
            raise PathError(f"the archive already holds {entry.rel_path}")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(entry.local_path, target)
        except OSError as exc:
            if exc.errno != 18:  # EXDEV: another file system; copy, then remove
                raise
            shutil.move(entry.local_path, target)
        return target

    def finish(self, emit: Emit) -> None:
        """Remove the source folders that are now empty, deepest first."""
        if not (self.remove_empty_dirs and self.active):
            return
        for folder in sorted(self._dirs, key=lambda p: len(p.parts), reverse=True):
            if folder in self._top_dirs and not self.remove_top_dirs:
                continue
            try:
                os.rmdir(folder)
            except OSError:
                continue  # not empty (or already gone): nothing to do
            emit({"type": "source_dir_removed", "path": str(folder)})


def _kept(entry: SourceEntry, why: str) -> dict[str, object]:
    return {"type": "source_kept", "path": entry.rel_path, "reason": why}


def archive_root(move_after_transfer: str, base_dir: Path, docroot: Path | None) -> Path:
    """The archive folder: inside the docroot when there is one (never leading out)."""
    if docroot is not None:
        return resolve_in_docroot(docroot, move_after_transfer, allow_root=False)
    return (base_dir / move_after_transfer).absolute()


# --- save before overwrite ------------------------------------------------------------------


def backup_name(final: Path, now: float | None = None) -> Path:
    """``name.YYYY.MM.DD.hh.mm.ss.N.ext``: the first N that is free, as Aspera names it."""
    stamp = time.strftime("%Y.%m.%d.%H.%M.%S", time.localtime(now))
    stem, dot, ext = final.name.rpartition(".")
    if not dot or not stem:
        stem, ext = final.name, ""
    for index in range(10_000):
        name = f"{stem}.{stamp}.{index}" + (f".{ext}" if ext else "")
        candidate = final.with_name(name)
        if not os.path.lexists(candidate):
            return candidate
    raise PathError(f"Cannot find a free name to save {final.name} before overwriting it")


# --- mirror deletion -------------------------------------------------------------------------


@dataclass
class _OpenDir:
    rel: str
    names: set[str] = field(default_factory=set)


class MirrorTracker:
    """``delete_before_transfer``: remove destination items the source folder does not have.

    Only folders the sender announced are mirrored. The manifest walks depth first, folders
    before their contents, so a folder's listing is complete as soon as an entry outside it
    arrives; then its destination is compared with the names announced in it. Kept: every
    announced name, its partial file and checkpoint, anything this session created there,
    and anything the filter rules exclude (excluded files are not part of the mirror).
    """

    def __init__(
        self,
        path_for_dir: Callable[[str], Path],
        partial_suffix: str,
        is_excluded: Callable[[str, bool], bool],
        on_delete: Callable[[str, Path], None],
    ) -> None:
        self._path_for_dir = path_for_dir
        self._suffixes = (partial_suffix, partial_suffix + CKPT_SUFFIX)
        self._is_excluded = is_excluded
        self._on_delete = on_delete
        self._stack: list[_OpenDir] = []
        self.created: set[Path] = set()

    def entry(self, rel: str, is_dir: bool) -> None:
        """An announced entry, in manifest order."""
        self._close_until_parent_of(rel)
        parent, _, name = rel.rpartition("/")
        if self._stack and self._stack[-1].rel == parent:
            self._stack[-1].names.add(name)
        if is_dir:
            self._stack.append(_OpenDir(rel))

    def finish(self) -> None:
        while self._stack:
            self._mirror(self._stack.pop())

    def _close_until_parent_of(self, rel: str) -> None:
        while self._stack and not rel.startswith(self._stack[-1].rel + "/"):
            self._mirror(self._stack.pop())

    def _kept(self, folder: _OpenDir, name: str, path: Path) -> bool:
        if name in folder.names or path in self.created:
            return True
        for suffix in self._suffixes:
            if name.endswith(suffix) and name[: -len(suffix)] in folder.names:
                return True
        return self._is_excluded(f"{folder.rel}/{name}", path.is_dir())

    def _mirror(self, folder: _OpenDir) -> None:
        try:
            target = self._path_for_dir(folder.rel)
            listing = list(os.scandir(target))
        except (OSError, SlipstreamError):
            return  # nothing there to mirror (or not a folder): the transfer reports it
        for item in listing:
            path = Path(item.path)
            if self._kept(folder, item.name, path):
                continue
            try:
                _delete(path)
            except OSError as exc:  # a mirror deletion that fails never stops the transfer
                log.warning("could not delete %s: %s", path, exc)
                continue
            self._on_delete(f"{folder.rel}/{item.name}", path)


def _delete(path: Path) -> None:
    """Delete a file, a link (never what it points to) or a whole folder."""
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)  # fd-based: it does not follow links inside the tree
    else:
        os.unlink(path)
