"""The path model shared by the client and the server.

Three jobs, in the order a transfer meets them:

* **Confinement** (:func:`resolve_in_docroot`, :func:`safe_relative`): every path that comes
  from a peer or a spec is interpreted inside a docroot and refused with
  :class:`~slipstream.errors.DocrootViolation` if it escapes, by ``..`` or by a symbolic link,
  before any I/O is done with it. As in Aspera, an absolute remote path is docroot-relative.
* **Source expansion** (:func:`expand_sources`, sender side): turns the spec's
  ``{source, destination?}`` pairs into a stream of :class:`SourceEntry`, each carrying the
  POSIX path the receiver will resolve under its destination.
* **Destination resolution** (:class:`DestinationResolver`, receiver side): Aspera's
  destination rule, and the final place of every incoming entry.

Names are ``str`` decoded with the file system encoding and ``surrogateescape`` (what
``os.scandir`` and ``os.fsdecode`` give), so a name that is not valid UTF-8 round-trips
through ``os.fsencode`` unchanged.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from slipstream.errors import (
    DocrootViolation,
    PathError,
    PermissionDenied,
    SourceNotFound,
    UsageError,
)

__all__ = [
    "DestinationResolver",
    "SkipCallback",
    "SourceEntry",
    "expand_sources",
    "resolve_in_docroot",
    "safe_relative",
]

log = logging.getLogger(__name__)

Kind = Literal["file", "dir", "link"]
SkipCallback = Callable[[Path, str], None]
"""``on_skip(local_path, reason)``: an entry met while walking a folder was left out."""


# --- confinement -----------------------------------------------------------------------


def _check_encodable(path: str, shown: str) -> None:
    """Refuse what the OS cannot take as a name: NUL, and lone surrogates (which JSON lets a
    peer send, but which are not the ``surrogateescape`` of any byte)."""
    if "\x00" in path:
        raise DocrootViolation(f"Path {shown!r} contains a NUL byte")
    try:
        os.fsencode(path)
    except UnicodeEncodeError as exc:
        raise PathError(f"Path {shown!r} is not a valid file name: {exc.reason}") from exc


def _lexical_parts(user_path: str, shown: str | None = None) -> list[str]:
    """Split a docroot-relative path into components, applying ``.`` and ``..`` lexically.

    ``..`` is applied to the text, never to the file system: ``link/..`` is the folder that
    holds ``link``, whatever the link points to. That keeps the meaning of a path independent
    of what the links say, and the caller then only ever touches the path we return.
    """
    shown = user_path if shown is None else shown
    _check_encodable(user_path, shown)
    parts: list[str] = []
    for comp in user_path.split("/"):  # a backslash is an ordinary character on POSIX
        if comp in ("", "."):
            continue
        if comp != "..":
            parts.append(comp)
        elif parts:
            parts.pop()
        else:
            raise DocrootViolation(f"Path {shown!r} leads outside the docroot")
    return parts


def _is_inside(root: str, path: str) -> bool:
    """Whether the normalised absolute ``path`` is ``root`` or below it."""
    prefix = root if root.endswith("/") else root + "/"
    return path == root or path.startswith(prefix)


def _real_docroot(docroot: Path) -> str:
    try:
        return os.path.realpath(docroot, strict=True)
    except OSError as exc:
        # A server configuration problem, not the peer's fault; never fall back to resolving
        # against something else. The path stays out: this message may reach the peer.
        raise PathError(f"The docroot is not accessible: {exc.strerror}") from exc


def _shown_under_root(root: str, path: str) -> str:
    """A path as the peer sees it: docroot-relative, so messages never leak server layout."""
    rel = os.path.relpath(path, root)
    return "/" if rel == "." else "/" + rel


def _lstat(path: str, shown: str) -> os.stat_result | None:
    """``os.lstat`` that returns ``None`` for "does not exist" and maps the other failures."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError as exc:
        raise PathError(f"Path {shown!r}: a component of it is not a folder") from exc
    except PermissionError as exc:
        raise PermissionDenied(f"Permission denied while resolving {shown!r}") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PathError(f"Path {shown!r} goes through a symbolic link loop") from exc
        raise PathError(f"Path {shown!r} cannot be resolved: {exc.strerror}") from exc


def _follow_link(root: str, link: str, shown: str) -> str:
    """The real target of ``link``, which must stay inside ``root``.

    Only where the chain finally lands is checked (as Aspera's "followed only when the target
    is inside the docroot"): every byte we read or write is at the returned path.
    """
    try:
        target = os.path.realpath(link, strict=True)
    except (FileNotFoundError, NotADirectoryError):
        # A dangling link: its target may still be created (a destination), so resolve as far
        # as the file system allows; the containment check below applies all the same.
        target = os.path.realpath(link)
    except PermissionError as exc:
        raise PermissionDenied(f"Permission denied while resolving {shown!r}") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PathError(f"Path {shown!r} goes through a symbolic link loop") from exc
        raise PathError(f"Path {shown!r} cannot be resolved: {exc.strerror}") from exc
    if not _is_inside(root, target):
        where = _shown_under_root(root, link)
        raise DocrootViolation(
            f"Path {shown!r} goes through the symbolic link {where!r}, "
            "which leads outside the docroot"
        )
    return target


def _walk_existing(root: str, parts: list[str], shown: str) -> tuple[str, list[str]]:
    """Resolve ``parts`` below ``root`` component by component, following links.

    Returns the real path of the deepest existing component and the parts that do not exist
    (the tail). Each step starts from a real path, so a symbolic link can only enter through
    the component just looked at, and that one is checked before going further.
    """
    current = root
    for index, name in enumerate(parts):
        candidate = os.path.join(current, name)
        st = _lstat(candidate, shown)
        if st is None:
            return current, parts[index:]
        if not stat.S_ISLNK(st.st_mode):
            current = candidate
            continue
        current = _follow_link(root, candidate, shown)
        landed = _lstat(current, shown)
        if landed is None:  # dangling: nothing below it exists either
            existing, missing = _split_missing(root, current)
            return existing, [*missing, *parts[index + 1 :]]
        if stat.S_ISLNK(landed.st_mode):  # realpath gives up on loops and returns the link
            raise PathError(f"Path {shown!r} goes through a symbolic link loop")
    return current, []


def _split_missing(root: str, path: str) -> tuple[str, list[str]]:
    """Split the real, partly missing target of a dangling link into its deepest existing
    folder and the missing names, so callers see one "existing + tail" shape."""
    missing: list[str] = []
    while path != root and not os.path.lexists(path):
        path, name = os.path.split(path)
        missing.insert(0, name)
    return path, missing


def _assert_no_links(root: str, path: str, shown: str) -> None:
    """Fail closed if the path we are about to return has a link in its existing part.

    Redundant by construction; it turns a resolver bug, or a folder swapped for a link while
    we looked, into a refusal instead of an escape.
    """
    current = root
    for name in os.path.relpath(path, root).split("/"):
        if name == ".":
            return
        current = os.path.join(current, name)
        st = _lstat(current, shown)
        if st is None:
            return
        if stat.S_ISLNK(st.st_mode):
            raise DocrootViolation(f"Path {shown!r} changed while it was being resolved")


def _resolve_parts(
    root: str, parts: list[str], shown: str, *, must_exist: bool, allow_root: bool
) -> Path:
    existing, tail = _walk_existing(root, parts, shown)
    if tail and must_exist:
        raise SourceNotFound(f"No such file or directory: {shown!r}")
    result = os.path.join(existing, *tail) if tail else existing
    if not _is_inside(root, result):  # defensive: _walk_existing only lands inside
        raise DocrootViolation(f"Path {shown!r} leads outside the docroot")
    if result == root and not allow_root:
        raise DocrootViolation(f"Path {shown!r} is the docroot itself, which is not allowed here")
    _assert_no_links(root, result, shown)
    return Path(result)


def resolve_in_docroot(
    docroot: Path, user_path: str, *, must_exist: bool = False, allow_root: bool = True
) -> Path:
    """The absolute real path that ``user_path`` names inside ``docroot``.

    ``user_path`` is docroot-relative whether or not it starts with ``/`` (``"/"``, ``""`` and
    ``"."`` are the docroot itself). It is normalised lexically, then its existing part is
    resolved with symbolic links followed, and any link leading outside the real docroot
    refuses it. The part that does not exist yet is appended to the deepest existing folder.

    Raises :class:`DocrootViolation` (``..`` past the root, NUL byte, escaping link, or the
    docroot itself when ``allow_root`` is false), :class:`SourceNotFound` when ``must_exist``
    and something is missing, :class:`PermissionDenied`, or :class:`PathError` (link loop, a
    file used as a folder, an unencodable name, docroot missing).
    """
    parts = _lexical_parts(user_path)
    root = _real_docroot(docroot)
    return _resolve_parts(root, parts, user_path, must_exist=must_exist, allow_root=allow_root)


def safe_relative(rel: str) -> str:
    """Validate a relative POSIX path received from a peer; return its normalised form.

    Refused with :class:`DocrootViolation`: absolute paths, ``..`` and empty components
    (``a//b``, a trailing ``/``), NUL bytes, and paths naming nothing (``""``, ``"."``); with
    its parent :class:`PathError`: characters no file name can hold (lone surrogates).
    ``.`` components are dropped, which is the only normalisation: anything else a peer sends
    in an odd form is an error rather than a guess.
    """
    _check_encodable(rel, rel)
    if rel.startswith("/"):
        raise DocrootViolation(f"Relative path {rel!r} is absolute")
    parts = rel.split("/")
    if ".." in parts:
        raise DocrootViolation(f"Relative path {rel!r} contains '..'")
    if "" in parts:
        raise DocrootViolation(f"Relative path {rel!r} has an empty component")
    kept = [p for p in parts if p != "."]
    if not kept:
        raise DocrootViolation(f"Relative path {rel!r} names no file")
    return "/".join(kept)


# --- where a spec path points, before any file system access ---------------------------


def _with_source_root(source_root: str | None, path: str) -> str:
    # A plain string prefix, as ascp's --source-prefix: an absolute ``path`` does not replace
    # the root, it goes below it (the doubled "/" vanishes in normalisation).
    return path if not source_root else f"{source_root}/{path}"


def _base_prefix(root: str, base_dir: Path) -> list[str]:
    """``base_dir`` as components relative to the real docroot (it must lie inside)."""
    real_base = os.path.realpath(base_dir)
    if not _is_inside(root, real_base):
        raise DocrootViolation(f"The base folder {str(base_dir)!r} is outside the docroot")
    rel = os.path.relpath(real_base, root)
    return [] if rel == "." else rel.split("/")


def _docroot_parts(root: str, base_dir: Path, path: str) -> list[str]:
    """Docroot-relative components of a spec path: absolute ones start at the docroot,
    relative ones at ``base_dir`` (the docroot itself on a server)."""
    if path.startswith("/"):
        return _lexical_parts(path)
    prefix = _base_prefix(root, base_dir)
    return _lexical_parts("/".join([*prefix, path]), shown=path)


def _local_parts(base_dir: Path, path: str) -> list[str]:
    """Absolute components of a local path (no docroot), relative ones under ``base_dir``."""
    _check_encodable(path, path)
    full = os.path.normpath(os.path.join(os.path.abspath(base_dir), path))
    return [p for p in full.split("/") if p]


def _local_join(parts: Sequence[str]) -> str:
    return "/" + "/".join(parts)


# --- source expansion ------------------------------------------------------------------


@dataclass(frozen=True)
class SourceEntry:
    """One file or folder to send.

    ``rel_path`` is where it goes below the destination the receiver resolves; ``mode`` is
    the permission bits only (``stat.S_IMODE``), the type is ``kind``.
    """

    local_path: Path
    rel_path: str
    kind: Kind
    size: int
    mtime_ns: int
    mode: int
    link_target: str | None = None  # kind "link": the link's text, as os.readlink gives it


@dataclass(frozen=True)
class _Found:
    """A top-level source located on disk."""

    real: Path
    parts: tuple[str, ...]  # normalised components, for naming and src_base
    st: os.stat_result


def _entry(real: Path, rel: str, st: os.stat_result) -> SourceEntry:
    is_dir = stat.S_ISDIR(st.st_mode)
    return SourceEntry(
        local_path=real,
        rel_path=rel,
        kind="dir" if is_dir else "file",
        size=0 if is_dir else st.st_size,
        mtime_ns=st.st_mtime_ns,
        mode=stat.S_IMODE(st.st_mode),
    )


def _join_rel(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


class _Expander:
    """State shared by the expansion of every source of one call."""

    def __init__(
        self,
        *,
        base_dir: Path,
        docroot: Path | None,
        source_root: str | None,
        follow_symlinks: bool,
        on_skip: SkipCallback | None,
        copy_links: bool = False,
    ) -> None:
        self.base_dir = base_dir
        self.copy_links = copy_links
        self.root = _real_docroot(docroot) if docroot is not None else None
        self.source_root = source_root
        self.follow = follow_symlinks
        self._on_skip = on_skip

    # -- naming ---------------------------------------------------------------------------

    def parts_of(self, path: str) -> list[str]:
        """Normalised components of a spec source path (``source_root`` applied)."""
        full = _with_source_root(self.source_root, path)
        if self.root is not None:
            return _docroot_parts(self.root, self.base_dir, full)
        return _local_parts(self.base_dir, full)

    def skip(self, path: Path, reason: str) -> None:
        if self._on_skip is None:
            log.warning("skipped %s: %s", path, reason)
        else:
            self._on_skip(path, reason)

    # -- top-level sources ----------------------------------------------------------------

    def locate(self, parts: list[str], source: str) -> _Found | None:
        """Find a top-level source; ``None`` when it is a link we do not follow."""
        if self.root is not None:
            real = self._locate_in_docroot(self.root, parts, source)
        else:
            real = self._locate_local(parts, source)
        if real is None:
            return None
        st = self._stat_top(real, source)
        return _Found(real, tuple(parts), st)

    def _locate_in_docroot(self, root: str, parts: list[str], shown: str) -> Path | None:
        if not self.follow and parts:
            parent = _resolve_parts(root, parts[:-1], shown, must_exist=True, allow_root=True)
            if self._unfollowed_link(parent / parts[-1], shown):
                return None
        return _resolve_parts(root, parts, shown, must_exist=True, allow_root=True)

    def _locate_local(self, parts: list[str], shown: str) -> Path | None:
        lexical = _local_join(parts)
        if self._unfollowed_link(Path(lexical), shown):
            return None
        try:
            return Path(os.path.realpath(lexical, strict=True))
        except FileNotFoundError as exc:
            raise SourceNotFound(f"{shown!r} is a broken symbolic link") from exc
        except OSError as exc:
            raise PathError(f"Source {shown!r} cannot be resolved: {exc.strerror}") from exc

    def _unfollowed_link(self, path: Path, shown: str) -> bool:
        """Whether a top-level source is a link left out (reported) by ``follow_symlinks``."""
        st = _lstat(str(path), shown)
        if st is None:
            raise SourceNotFound(f"No such file or directory: {shown!r}")
        if stat.S_ISLNK(st.st_mode) and not self.follow:
            self.skip(path, "symbolic link (links are not followed)")
            return True
        return False

    def _stat_top(self, real: Path, shown: str) -> os.stat_result:
        try:
            st = os.stat(real)
        except FileNotFoundError as exc:
            raise SourceNotFound(f"No such file or directory: {shown!r}") from exc
        except PermissionError as exc:
            raise PermissionDenied(f"Permission denied: {shown!r}") from exc
        if stat.S_ISREG(st.st_mode):
            if not os.access(real, os.R_OK):
                raise PermissionDenied(f"Permission denied: {shown!r} is not readable")
        elif not stat.S_ISDIR(st.st_mode):
            raise PathError(f"Source {shown!r} is not a regular file or a folder")
        return st

    # -- walking folders ------------------------------------------------------------------

    def list_top(self, real: Path, shown: str) -> list[os.DirEntry[str]]:
        try:
            return _sorted_listing(real)
        except PermissionError as exc:
            raise PermissionDenied(f"Permission denied: cannot list folder {shown!r}") from exc
        except OSError as exc:
            raise PathError(f"Cannot list folder {shown!r}: {exc.strerror}") from exc

    def walk(
        self, top: _Found, listing: list[os.DirEntry[str]], prefix: str
    ) -> Iterator[SourceEntry]:
        """Everything below a folder, depth first, sorted by name, folders before contents.

        An explicit stack rather than recursion: a deep tree must not hit the interpreter's
        recursion limit, and each folder is only listed when the walk reaches it, so the
        first entries go out before the scan of a large tree is over.
        """
        top_id = (top.st.st_dev, top.st.st_ino)
        stack = [(iter(listing), prefix, frozenset({top_id}))]
        while stack:
            entries, rel_dir, ancestors = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            if self.copy_links and entry.is_symlink():
                link = self.link_entry(Path(entry.path), _join_rel(rel_dir, entry.name))
                if link is not None:
                    yield link
                continue
            found = self._classify(entry)
            if found is None:
                continue
            real, st = found
            rel = _join_rel(rel_dir, entry.name)
            if not stat.S_ISDIR(st.st_mode):
                yield _entry(real, rel, st)
                continue
            child = self._enter(Path(entry.path), real, st, ancestors)
            if child is not None:
                yield _entry(real, rel, st)
                stack.append((iter(child[0]), rel, child[1]))

    def _enter(
        self,
        path: Path,
        real: Path,
        st: os.stat_result,
        ancestors: frozenset[tuple[int, int]],
    ) -> tuple[list[os.DirEntry[str]], frozenset[tuple[int, int]]] | None:
        """List a sub-folder, unless it is one of its own ancestors (a link loop).

        Identity is (device, inode), so a loop is caught however the link spells its target.
        """
        ident = (st.st_dev, st.st_ino)
        if ident in ancestors:
            self.skip(path, "symbolic link loop: the folder contains itself")
            return None
        try:
            listing = _sorted_listing(real)
        except OSError as exc:
            self.skip(path, f"cannot list folder: {exc.strerror}")
            return None
        return listing, ancestors | {ident}

    def _classify(self, entry: os.DirEntry[str]) -> tuple[Path, os.stat_result] | None:
        """The real path and stat of a folder entry, or ``None`` (reported) to leave it out."""
        path = Path(entry.path)
        try:
            if entry.is_symlink():
                real = self._follow_nested(path)
                if real is None:
                    return None
                st = os.stat(real)
            else:
                real, st = path, entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            self.skip(path, "vanished while the folder was being read")
            return None
        except OSError as exc:
            self.skip(path, exc.strerror or str(exc))
            return None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            self.skip(path, "not a regular file or a folder")
            return None
        return real, st

    def link_entry(self, path: Path, rel: str) -> SourceEntry | None:
        """A symbolic link sent as a link (symlink_policy copy). Within a docroot, a link whose
        target lies outside is left out (reported): its text would reveal the layout there."""
        try:
            target = os.readlink(path)
            st = os.lstat(path)
        except OSError as exc:
            self.skip(path, exc.strerror or str(exc))
            return None
        if self.root is not None and not _is_inside(self.root, os.path.realpath(path)):
            self.skip(path, "symbolic link leads outside the docroot")
            return None
        return SourceEntry(path, rel, "link", 0, st.st_mtime_ns, 0o777, link_target=target)

    def top_link(self, parts: list[str], shown: str) -> Path | None:
        """The lexical path of a top-level source when it is itself a link (copy policy)."""
        if not parts:
            return None
        if self.root is not None:
            parent = _resolve_parts(self.root, parts[:-1], shown, must_exist=True, allow_root=True)
            path = parent / parts[-1]
        else:
            path = Path(_local_join(parts))
        st = _lstat(str(path), shown)
        return path if st is not None and stat.S_ISLNK(st.st_mode) else None

    def _follow_nested(self, path: Path) -> Path | None:
        if not self.follow:
            self.skip(path, "symbolic link (links are not followed)")
            return None
        try:
            real = os.path.realpath(path, strict=True)
        except (FileNotFoundError, NotADirectoryError):
            self.skip(path, "broken symbolic link")
            return None
        except OSError as exc:
            loop = exc.errno == errno.ELOOP
            self.skip(path, "symbolic link loop" if loop else (exc.strerror or str(exc)))
            return None
        if self.root is not None and not _is_inside(self.root, real):
            self.skip(path, "symbolic link leads outside the docroot")
            return None
        return Path(real)


def _sorted_listing(folder: Path) -> list[os.DirEntry[str]]:
    # Sorted so that two runs (and a resumed run) announce files in the same order.
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name)


Mode = Literal["plain", "pairs", "src_base"]


def _mode_of(pairs: Sequence[tuple[str, str | None]], src_base: str | None) -> Mode:
    """Which layout rule applies; mixing them is refused before anything is read."""
    if not pairs:
        raise UsageError("No source to transfer")
    with_dest = sum(1 for _, dest in pairs if dest is not None)
    if with_dest and with_dest != len(pairs):
        raise UsageError("Either every source has a destination (a pair list) or none has")
    if with_dest and src_base is not None:
        raise UsageError("src_base cannot be combined with a pair list")
    if with_dest:
        return "pairs"
    return "src_base" if src_base is not None else "plain"


def expand_sources(
    pairs: Sequence[tuple[str, str | None]],
    *,
    base_dir: Path,
    docroot: Path | None,
    source_root: str | None = None,
    src_base: str | None = None,
    follow_symlinks: bool = True,
    on_skip: SkipCallback | None = None,
    copy_links: bool = False,
) -> Iterator[SourceEntry]:
    """Everything to send, as a stream, for a spec's ``paths``.

    Usage errors (mixed pair list, ``src_base`` with pairs, a bad pair destination, an empty
    list) are raised by this call; each source is only looked at when the stream reaches it,
    and its problems (:class:`SourceNotFound`, :class:`PermissionDenied`,
    :class:`DocrootViolation`, :class:`UsageError`) are raised from the iteration.

    Entries met while walking a folder that cannot be sent (escaping or broken links, link
    loops, special files, unreadable sub-folders, links when ``follow_symlinks`` is false) are
    left out and reported to ``on_skip(path, reason)``, or logged when it is ``None``.
    With ``copy_links``, symbolic links are not followed but yielded as ``kind="link"``
    entries carrying their text (within a docroot, only links whose target stays inside).
    """
    mode = _mode_of(pairs, src_base)
    destinations = [safe_relative(dest.lstrip("/")) if dest else "" for _, dest in pairs]
    if mode == "pairs" and "" in destinations:
        raise UsageError("A pair list destination is empty")
    expander = _Expander(
        base_dir=base_dir,
        docroot=docroot,
        source_root=source_root,
        follow_symlinks=follow_symlinks,
        on_skip=on_skip,
        copy_links=copy_links,
    )
    base_parts = expander.parts_of(src_base) if src_base is not None else None
    sources = [source for source, _ in pairs]
    return _expand(expander, mode, sources, destinations, base_parts)


def _expand(
    expander: _Expander,
    mode: Mode,
    sources: list[str],
    destinations: list[str],
    base_parts: list[str] | None,
) -> Iterator[SourceEntry]:
    for source, dest in zip(sources, destinations, strict=True):
        parts = expander.parts_of(source)
        if base_parts is not None and parts[: len(base_parts)] != base_parts:
            # Checked on the text, before any I/O: a source outside src_base is a usage
            # error whether or not it exists.
            raise UsageError(f"Source {source!r} is not below src_base")
        link = expander.top_link(parts, source) if expander.copy_links else None
        if link is not None:
            entry = expander.link_entry(link, _link_rel(mode, parts, dest, base_parts))
            if entry is not None:
                yield entry
            continue
        found = expander.locate(parts, source)
        if found is None:
            continue
        if mode == "pairs":
            yield _pair_entry(found, source, dest)
            continue
        if base_parts is None:
            rel = _plain_rel(found, source)
        else:
            rel = _based_rel(found, source, len(base_parts))
        yield from _tree(expander, found, source, rel)


def _link_rel(mode: Mode, parts: list[str], dest: str, base_parts: list[str] | None) -> str:
    """Where a top-level source that is a link (copy policy) goes: named as the source is."""
    if mode == "pairs":
        return dest
    if base_parts is not None:
        return "/".join(parts[len(base_parts) :])
    return parts[-1]


def _pair_entry(found: _Found, source: str, dest: str) -> SourceEntry:
    if stat.S_ISDIR(found.st.st_mode):
        raise UsageError(f"Source {source!r} is a folder: a pair list can only name files")
    return _entry(found.real, dest, found.st)


def _plain_rel(found: _Found, source: str) -> str:
    # Named after the path as given, not its link target: sending "latest -> v2.1" makes
    # "latest" at the destination, as cp and ascp do.
    if not found.parts:
        raise UsageError(
            f"Source {source!r} is the root folder itself: name a folder below it, "
            "or use src_base to send its contents"
        )
    return found.parts[-1]


def _based_rel(found: _Found, source: str, base_len: int) -> str:
    """The part of the source below ``src_base`` (``""`` for the base folder itself)."""
    rel = "/".join(found.parts[base_len:])
    if not rel and not stat.S_ISDIR(found.st.st_mode):
        raise UsageError(f"Source {source!r} is src_base itself: nothing would name it")
    return rel


def _tree(expander: _Expander, found: _Found, source: str, rel: str) -> Iterator[SourceEntry]:
    """A top-level source and, for a folder, everything below it.

    An empty ``rel`` (the src_base folder itself) sends only its contents.
    """
    if not stat.S_ISDIR(found.st.st_mode):
        yield _entry(found.real, rel, found.st)
        return
    # Listed before the folder's own entry, so an unreadable source fails before any of it
    # has been announced.
    listing = expander.list_top(found.real, source)
    if rel:
        yield _entry(found.real, rel, found.st)
    yield from expander.walk(found, listing, rel)


# --- destination resolution ------------------------------------------------------------


class DestinationResolver:
    """Where incoming entries land, on the receiving side.

    ``destination`` is the spec's ``destination_root``: docroot-relative when ``docroot`` is
    set (``"/"`` is the docroot), else relative to ``base_dir`` unless absolute.

    Aspera's rule decides what it means (:meth:`prepare`): it is a *new name* for the one
    source only with ``single_source``, no ``create_dir``, not ``pair_mode``, and the
    destination absent with its parent folder present; otherwise it is a folder the entries
    go into. Pass ``pair_mode=True`` for pair lists *and* for ``src_base`` transfers: in
    both, ``rel_path`` is already the full path below the destination folder.

    An existing non-folder destination with a single source (and neither ``create_dir`` nor
    ``pair_mode``) is also taken as the new name, so re-sending ``a.txt`` to ``b.txt``
    reaches the overwrite policy instead of failing.
    """

    def __init__(
        self,
        destination: str,
        *,
        docroot: Path | None,
        base_dir: Path,
        single_source: bool,
        create_dir: bool,
        pair_mode: bool,
    ) -> None:
        self.destination = destination
        self._root = _real_docroot(docroot) if docroot is not None else None
        # Lexical validation now, so a ".." escape is refused before anything else happens.
        if self._root is not None:
            self._parts = _docroot_parts(self._root, base_dir, destination)
        else:
            self._parts = _local_parts(base_dir, destination)
        self._may_rename = single_source and not create_dir and not pair_mode
        self._create_dir = create_dir
        self._renames: bool | None = None

    @property
    def renames(self) -> bool:
        """Whether the destination is the new name of the single source (after prepare)."""
        if self._renames is None:
            raise RuntimeError("DestinationResolver.prepare() has not been called")
        return self._renames

    def _resolve(self, parts: Sequence[str]) -> Path:
        if self._root is None:
            return Path(_local_join(parts))
        shown = _local_join(parts)
        return _resolve_parts(self._root, list(parts), shown, must_exist=False, allow_root=True)

    def prepare(self) -> None:
        """Decide folder or new name, and create the folder when ``create_dir`` asks for it."""
        target = self._resolve(self._parts)
        if target.is_dir():
            self._renames = False
        elif target.exists() or target.is_symlink():
            self._prepare_existing_file()
        elif self._create_dir:
            self._make_folder(target)
            self._renames = False
        else:
            self._prepare_absent(target)

    def _prepare_existing_file(self) -> None:
        if not self._may_rename:
            raise PathError(
                f"Destination {self.destination!r} is a file, but a folder is needed here"
            )
        self._renames = True

    def _prepare_absent(self, target: Path) -> None:
        if not self._may_rename:
            raise PathError(
                f"Destination folder {self.destination!r} does not exist "
                "(set create_dir to create it)"
            )
        if not target.parent.is_dir():
            raise PathError(
                f"The folder that would hold destination {self.destination!r} does not exist"
            )
        self._renames = True

    def _make_folder(self, target: Path) -> None:
        try:
            os.makedirs(target, exist_ok=True)
        except PermissionError as exc:
            raise PermissionDenied(
                f"Permission denied creating destination folder {self.destination!r}"
            ) from exc
        except OSError as exc:  # a file in the way of one of the parents
            raise PathError(
                f"Cannot create destination folder {self.destination!r}: {exc.strerror}"
            ) from exc
        # Re-resolve: what we created must still be where the checks said (no link swapped in).
        if self._resolve(self._parts) != target or not target.is_dir():
            raise DocrootViolation(f"Destination {self.destination!r} changed while created")

    def path_for(self, rel_path: str, *, kind: Kind | None = None) -> Path:
        """The absolute place for an incoming entry.

        ``rel_path`` is validated with :func:`safe_relative`; in the rename case its first
        component is replaced by the destination's name. With a docroot the result is
        resolved again inside it (links followed only inside). Parent folders are not
        created: see :meth:`ensure_parent`. ``kind="dir"`` refuses turning an existing
        file destination into a folder.
        """
        parts = safe_relative(rel_path).split("/")
        if self.renames:
            parts = parts[1:]
        target = self._resolve([*self._parts, *parts])
        if kind == "dir" and not parts and target.exists() and not target.is_dir():
            raise PathError(
                f"Destination {self.destination!r} is a file and cannot receive folder {rel_path!r}"
            )
        return target

    def link_path_for(self, rel_path: str) -> Path:
        """Like :meth:`path_for`, but the last component is not followed if it is a link:
        the place where a received symbolic link itself is created or replaced."""
        parts = safe_relative(rel_path).split("/")
        full = [*self._parts, *(parts[1:] if self.renames else parts)]
        if not full:
            raise DocrootViolation(f"Link {rel_path!r} would replace the destination root")
        return self._resolve(full[:-1]) / full[-1]

    def confinement_root(self) -> Path:
        """The folder every received entry lands in (the destination, or its parent when
        the destination is the new name of a single source)."""
        return self._resolve(self._parts[:-1] if self.renames else self._parts)

    def ensure_parent(self, rel_path: str) -> Path:
        """:meth:`path_for`, with the folders above it created (pair lists and src_base send
        deep paths without a folder entry for each level)."""
        target = self.path_for(rel_path)
        try:
            os.makedirs(target.parent, exist_ok=True)
        except PermissionError as exc:
            raise PermissionDenied(f"Permission denied creating folders for {rel_path!r}") from exc
        except OSError as exc:
            raise PathError(f"Cannot create folders for {rel_path!r}: {exc.strerror}") from exc
        if self.path_for(rel_path) != target:
            raise DocrootViolation(f"Destination of {rel_path!r} changed while it was created")
        return target
