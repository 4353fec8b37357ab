"""The receiving side's file semantics: options, per-file state, and finishing a file.

Finishing is the only step that gives a file its final name, and it does so only after the
digest of the whole received file matched the sender's. Everything else a received file can
need (decryption, timestamps, saving the old version, the checksum the user asked for)
happens on the way, in :func:`finish_file`, which is plain blocking code so the driver can run
it inline for small files and in a thread for big ones. Big files were mostly hashed while
they arrived (:func:`hash_while_arriving`, engine/prefix_hash.py): the finish reads the tail.

One range of a split file (multi_session_threshold) is finished by :func:`finish_piece`: it
verifies the range alone, and only the range that completes the file renames it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from slipstream.engine.blockio import FileSlot, open_nofollow
from slipstream.engine.digests import FileDigests, checksum_algorithm, digest_path
from slipstream.engine.disposition import backup_name
from slipstream.engine.envelope import DEFAULT_EXTENSION, Keyring, decrypt_fd
from slipstream.engine.multisession import session_job
from slipstream.engine.paths import resolve_in_docroot
from slipstream.engine.prefix_hash import PrefixHash
from slipstream.engine.resume import (
    CheckpointWriter,
    FileIdentity,
    RangeRecord,
    checkpoint_path,
    remove_checkpoint,
    remove_split_sidecars,
)
from slipstream.engine.selection import FilterRules
from slipstream.errors import (
    ChecksumMismatch,
    DestinationExists,
    DocrootViolation,
    PathError,
)
from slipstream.spec import TransferSpec

PARTIAL_SUFFIX = ".partial"
DECRYPT_SUFFIX = ".decrypting"


@dataclass
class ReceiveOptions:
    """What the receiver decides on its own (overwrite policy, timestamps, ...)."""

    overwrite: str = "diff"
    preserve_times: bool = False  # modification time (kept for the HTTP fallback's use)
    partial_suffix: str = PARTIAL_SUFFIX
    resume: str = "sparse_checksum"
    preserve_atime: bool = False
    save_before_overwrite: bool = False
    allow_overwrite: bool = True  # the server's veto on replacing existing files
    checksum: str | None = None  # file_checksum algorithm
    keyring: Keyring | None = None  # decrypt envelopes (client downloads only)
    extension: str = DEFAULT_EXTENSION
    encrypted_upload: bool = False  # receiving envelopes: resuming needs the sender's key
    fail_bad_filepass: bool = False
    mirror: bool = False  # delete_before_transfer
    filters: FilterRules = field(default_factory=lambda: FilterRules([]))
    symlink_policy: str = "follow"
    link_root: Path | None = None  # links must point inside (the docroot on a server)
    job: str = ""  # multi_session: the job's id, shared by its sessions (split files)

    @classmethod
    def from_spec(
        cls, spec: TransferSpec, *, allow_overwrite: bool = True, link_root: Path | None = None
    ) -> ReceiveOptions:
        from slipstream.engine.outgoing import envelope_extension

        decrypt = spec.content_protection == "decrypt" and spec.content_protection_passphrase
        return cls(
            overwrite=spec.overwrite,
            preserve_times=bool(spec.preserve_times or spec.preserve_modification_time),
            resume=spec.resume,
            preserve_atime=bool(spec.preserve_times or spec.preserve_access_time),
            save_before_overwrite=spec.save_before_overwrite,
            allow_overwrite=allow_overwrite,
            checksum=checksum_algorithm(spec.file_checksum),
            keyring=Keyring(spec.content_protection_passphrase or "") if decrypt else None,
            extension=envelope_extension(spec),
            encrypted_upload=spec.content_protection == "encrypt",
            fail_bad_filepass=bool(spec.fail_bad_filepass),
            mirror=bool(spec.delete_before_transfer),
            filters=FilterRules.from_spec(spec),
            symlink_policy=spec.symlink_policy or "follow",
            link_root=link_root,
            job=session_job(spec) or "",
        )


@dataclass
class IncomingFile:
    """One announced file on the receiving side, from FILE to FILE_DONE."""

    file_id: int
    rel_path: str  # as announced
    dest_rel: str  # where it lands (a decrypted envelope loses its extension)
    size: int  # bytes that travel (the envelope's size for envelopes)
    mtime_ns: int
    atime_ns: int | None = None
    env_header: bytes | None = None  # an envelope to decrypt: its header
    final: Path = Path()
    partial: Path = Path()
    offset: int = 0  # resumed from this byte
    slot: FileSlot | None = None
    checkpoint: CheckpointWriter | None = None
    digest: str | None = None  # the sender's, from FILE_END
    checksum: str | None = None
    blocks_done: bool = False
    finishing: bool = False
    plain_size: int | None = None  # an envelope's plaintext size, once its header is open
    piece: tuple[int, int] | None = None  # a split file's range: (offset, length)
    prefix_hash: PrefixHash | None = None  # big files: hashed while they arrive

    @property
    def landed_size(self) -> int:
        """The size of the file as it lands: the plaintext of an envelope being decrypted."""
        return self.plain_size if self.plain_size is not None else self.size

    @property
    def decrypt(self) -> bool:
        return self.env_header is not None

    @property
    def start(self) -> int:
        """The first byte that travels in this session (0, or a split file's range)."""
        return self.piece[0] if self.piece is not None else 0

    @property
    def end(self) -> int:
        return self.piece[0] + self.piece[1] if self.piece is not None else self.size

    def range_record(self, job: str) -> RangeRecord:
        return RangeRecord(self.partial, job, FileIdentity(self.size, self.mtime_ns))


@dataclass(frozen=True)
class FinishResult:
    digests: FileDigests
    backup: Path | None = None
    whole: bool = True  # False: a range of a split file, verified; another range renames
    ranges: tuple[tuple[int, int, str], ...] = ()  # a split file's ranges, when whole


def hash_while_arriving(incoming: IncomingFile, options: ReceiveOptions) -> None:
    """Give ``incoming`` a running digest of its good prefix (engine/prefix_hash.py), from
    its first byte (a resumed file's prefix too) or its range's: the finish then hashes
    only what the background passes have not reached."""
    algorithm = None if incoming.piece is not None else options.checksum
    incoming.prefix_hash = PrefixHash(incoming.partial, algorithm, incoming.start)


def received_digests(incoming: IncomingFile, options: ReceiveOptions) -> FileDigests:
    """The digests of the whole received file (its partial copy). Blocking."""
    if incoming.prefix_hash is not None:
        return incoming.prefix_hash.finish()
    return digest_path(incoming.partial, options.checksum)


def finish_file(incoming: IncomingFile, options: ReceiveOptions) -> FinishResult:
    """Verify, (decrypt,) stamp and rename a completely received file. Blocking."""
    digests = received_digests(incoming, options)
    _verify(incoming, digests)
    ready = incoming.partial
    if incoming.decrypt:
        ready = _decrypt(incoming, options)
    try:
        backup = _install(ready, incoming, options)
    except BaseException:
        if ready != incoming.partial:
            ready.unlink(missing_ok=True)
        raise
    if ready != incoming.partial:
        incoming.partial.unlink(missing_ok=True)
    if incoming.checkpoint is not None or incoming.offset:
        remove_checkpoint(incoming.partial)
    return FinishResult(digests, backup)


def finish_piece(incoming: IncomingFile, options: ReceiveOptions) -> FinishResult:
    """Verify one range of a split file and settle it in the file's range record. Blocking.

    The range whose settling completes the file (exactly one, whatever the order) stamps,
    renames and cleans up; the others leave the partial to it.
    """
    start, length = incoming.start, incoming.end - incoming.start
    digests = _range_digests(incoming)
    _verify(incoming, digests)
    settled = incoming.range_record(options.job).settle(start, length, digests.digest)
    if not settled.last:
        return FinishResult(digests, whole=False)
    backup = _install(incoming.partial, incoming, options)
    remove_split_sidecars(incoming.partial)
    remove_checkpoint(incoming.partial)  # an unsplit earlier run's, if any
    return FinishResult(digests, backup, ranges=settled.ranges)


def _range_digests(incoming: IncomingFile) -> FileDigests:
    """The digest of a split file's range alone (no checksum: not with split files)."""
    prefix = incoming.prefix_hash or PrefixHash(incoming.partial, None, incoming.start)
    return prefix.finish(incoming.end)


def size_shared_partial(partial: Path, size: int) -> None:
    """Create a split file's partial, or bring it to the whole file's size.

    Never truncated below ``size`` nor opened with O_TRUNC: other ranges, in other sessions
    or processes, may be writing into it right now. Every range sizes it the same way, so
    the order they come in does not matter; a stale partial keeps its bytes, and each range
    is rewritten unless its own checkpoint vouches for it.
    """
    fd = open_nofollow(partial, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _install(ready: Path, incoming: IncomingFile, options: ReceiveOptions) -> Path | None:
    """Stamp the verified file and give it its final name; returns the saved old version."""
    _apply_times(ready, incoming, options)
    if not options.allow_overwrite and os.path.lexists(incoming.final):
        raise DestinationExists(
            f"{incoming.dest_rel}: exists, and this server does not allow overwriting"
        )
    backup = _save_existing(incoming.final) if options.save_before_overwrite else None
    os.replace(ready, incoming.final)
    return backup


def _verify(incoming: IncomingFile, digests: FileDigests) -> None:
    # An empty or missing sender digest is a mismatch: no file is renamed unverified.
    if not incoming.digest or digests.digest != incoming.digest:
        raise ChecksumMismatch(
            f"{incoming.dest_rel}: received bytes differ from the sender's",
            internal_message=f"sender {incoming.digest!r}, receiver {digests.digest}",
        )
    if incoming.checksum and digests.checksum and incoming.checksum != digests.checksum:
        raise ChecksumMismatch(
            f"{incoming.dest_rel}: file checksum differs from the sender's",
            internal_message=f"sender {incoming.checksum}, receiver {digests.checksum}",
        )


def _decrypt(incoming: IncomingFile, options: ReceiveOptions) -> Path:
    assert options.keyring is not None
    plain = incoming.partial.with_name(incoming.partial.name + DECRYPT_SUFFIX)
    src = os.open(incoming.partial, os.O_RDONLY)
    try:
        dst = open_nofollow(plain, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            decrypt_fd(src, dst, options.keyring, incoming.rel_path)
        except BaseException:
            os.close(dst)
            plain.unlink(missing_ok=True)
            raise
        os.close(dst)
    finally:
        os.close(src)
    return plain


def _apply_times(path: Path, incoming: IncomingFile, options: ReceiveOptions) -> None:
    keep_mtime = options.preserve_times and incoming.mtime_ns
    source_atime = incoming.atime_ns if options.preserve_atime else None
    if not keep_mtime and source_atime is None:
        return
    current = os.lstat(path)
    atime = source_atime if source_atime is not None else current.st_atime_ns
    mtime = incoming.mtime_ns if keep_mtime else current.st_mtime_ns
    os.utime(path, ns=(atime, mtime), follow_symlinks=False)  # stamps no link's target


def _save_existing(final: Path) -> Path | None:
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    backup = backup_name(final)
    os.rename(final, backup)
    return backup


def discard_partial(incoming: IncomingFile) -> None:
    """Forget a partial whose content proved wrong, so the next run starts clean.

    A range of a split file forgets only its own checkpoint: the partial is shared with
    the other ranges, and the range is sent whole next time.
    """
    if incoming.checkpoint is not None:
        incoming.checkpoint.close()
    if incoming.piece is not None:
        checkpoint_path(incoming.partial, incoming.start).unlink(missing_ok=True)
        return
    incoming.partial.unlink(missing_ok=True)
    incoming.partial.with_name(incoming.partial.name + DECRYPT_SUFFIX).unlink(missing_ok=True)
    remove_checkpoint(incoming.partial)


# --- symbolic links (symlink_policy copy / copy+force) --------------------------------------------


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_link_target(link: Path, target: str, root: Path) -> None:
    """Refuse a link whose target is absolute or leads outside ``root``.

    The target is interpreted from the link's folder, lexically and then through the links
    that already exist on the way, so no chain of links can lead out.
    """
    if not target or "\x00" in target or os.path.isabs(target):
        raise DocrootViolation(f"Link {link.name!r} -> {target!r}: absolute targets are refused")
    real_root = os.path.realpath(root)
    joined = os.path.normpath(os.path.join(os.path.realpath(link.parent), target))
    if not _inside(real_root, joined):
        raise DocrootViolation(f"Link {link.name!r} -> {target!r} leads outside the destination")
    resolve_in_docroot(Path(real_root), os.path.relpath(joined, real_root))


def place_link(link: Path, target: str, root: Path, policy: str) -> str:
    """Create (or replace) ``link``; returns "" when done, else why it was skipped."""
    check_link_target(link, target, root)
    try:
        st = os.lstat(link)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode) and os.readlink(link) == target:
            return "identical"
        if stat.S_ISDIR(st.st_mode):
            return "exists"  # a folder is never replaced by a link
        if stat.S_ISREG(st.st_mode) and policy != "copy+force":
            return "exists"
    temporary = link.with_name(f".{link.name}.slipstream-link")
    temporary.unlink(missing_ok=True)
    try:
        os.symlink(target, temporary)
        os.replace(temporary, link)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise PathError(f"Cannot create link {link.name!r}: {exc.strerror}") from exc
    return ""
