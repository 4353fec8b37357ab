"""A client transfer over the HTTPS fallback: same paths, rules and events as over UDP.

:func:`run_http_transfer` is what ``engine.job`` switches to when the UDP port does not
answer (``http_fallback: true``) or at once (``"force"``). It takes the same source
expansion and destination resolver the UDP path uses (passed in by the job, so both
transports lay files out identically), writes downloads to ``NAME.partial`` and renames
them only after the server's digest matches, and emits the UDP path's event types
(``session_start``, ``progress``, ``file_done``/``file_skipped``/``file_error``) with
``"transport": "http"``.

Resume is by byte ranges: a request cut by the network is retried from what the other side
holds (the server's ``received`` for uploads, the partial's length for downloads), and a
later run continues a partial that is shorter than its file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slipstream.engine.blockio import file_digest, new_digest, os_error_to_slipstream
from slipstream.engine.paths import DestinationResolver, SourceEntry
from slipstream.engine.session import ReceiveOptions, SessionTotals
from slipstream.errors import (
    ChecksumMismatch,
    NetworkError,
    SlipstreamError,
    UsageError,
)
from slipstream.spec import TransferSpec
from slipstream.transport.http_fallback import CHUNK_BYTES, RETRIES, FallbackClient

Emit = Callable[[dict[str, Any]], None]
DEFAULT_FALLBACK_PORT = 8443


@dataclass(frozen=True)
class FallbackTarget:
    """Where and how to reach the server's HTTPS fallback."""

    host: str
    port: int
    authorization: str  # the Authorization header value
    fingerprint: str | None  # pinned certificate, or None for the system's CAs
    xfer_id: str | None = None


def plan_fallback(
    spec: TransferSpec, password: str | None, accept: dict[str, Any] | None
) -> FallbackTarget:
    """The fallback endpoint and credentials.

    After an SSH session (``accept`` given), the server's ACCEPT carries a ticket (a token
    bound to this very transfer) and the certificate fingerprint, both trusted as much as
    the SSH host key; otherwise the spec's token, or its user and password, are used.
    """
    offer = (accept or {}).get("fallback") or {}
    port = spec.https_fallback_port or offer.get("port") or DEFAULT_FALLBACK_PORT
    fingerprint = offer.get("fingerprint") or spec.https_fallback_fingerprint
    if offer.get("ticket"):
        authorization = f"Bearer {offer['ticket']}"
    elif spec.authentication == "token" and spec.token:
        authorization = f"Bearer {spec.token}"
    elif password is not None and spec.remote_user:
        pair = f"{spec.remote_user}:{password}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode("ascii")
    else:
        raise UsageError("The HTTPS fallback needs a token or a password (SSH keys do not work)")
    assert spec.remote_host is not None
    xfer_id = (accept or {}).get("xfer_id")
    return FallbackTarget(spec.remote_host, int(port), authorization, fingerprint, xfer_id)


async def run_http_transfer(
    spec: TransferSpec,
    wire_spec: dict[str, Any],
    target: FallbackTarget,
    emit: Emit,
    *,
    sources: Callable[[], Iterable[SourceEntry]],
    destination: Callable[[], DestinationResolver],
    progress_interval: float = 1.0,
) -> SessionTotals:
    """Run the whole transfer over HTTPS; returns the totals (raises on a session failure)."""
    if target.xfer_id:
        tags = dict(wire_spec.get("tags") or {})
        tags["aspera"] = {**dict(tags.get("aspera") or {}), "xfer_id": target.xfer_id}
        wire_spec = {**wire_spec, "tags": tags}
    async with FallbackClient(
        target.host, target.port, authorization=target.authorization, fingerprint=target.fingerprint
    ) as client:
        opened = await client.open_session(wire_spec)
        emit(
            {
                "type": "session_start",
                "direction": spec.direction,
                "host": target.host,
                "user": spec.remote_user,
                "transport": "http",
                "https_fallback_port": target.port,
                "xfer_id": opened.get("xfer_id"),
            }
        )
        job = _HttpJob(client, spec, emit)
        progress = asyncio.get_running_loop().create_task(job.report_progress(progress_interval))
        try:
            if spec.direction == "send":
                await job.upload(sources())
            else:
                await job.download(opened.get("manifest") or [], destination())
        except SlipstreamError as exc:
            with contextlib.suppress(SlipstreamError):
                await client.call("POST", "/close", {"error": exc.to_dict()})
            raise
        finally:
            progress.cancel()
        job.totals.finished = time.monotonic()
        await client.call("POST", "/close", job.totals.as_dict())
        return job.totals


class _HttpJob:
    """One session's file loop, in either direction."""

    def __init__(self, client: FallbackClient, spec: TransferSpec, emit: Emit) -> None:
        self.client = client
        self.spec = spec
        self.emit = emit
        self.options = ReceiveOptions.from_spec(spec)
        self.totals = SessionTotals()
        self.moved = 0  # payload bytes that crossed the network this session
        self.expected = 0

    # --- uploads -------------------------------------------------------------------------

    async def upload(self, entries: Iterable[SourceEntry]) -> None:
        for entry in entries:
            if entry.kind == "dir":
                await self.client.call(
                    "POST", "/dirs", {"path": entry.rel_path, "mode": entry.mode}
                )
                self.totals.dirs += 1
                continue
            self.expected += entry.size
            await self._upload_file(entry)

    async def _upload_file(self, entry: SourceEntry) -> None:
        for attempt in range(2):
            answer = await self.client.call(
                "POST",
                "/files",
                {
                    "path": entry.rel_path,
                    "size": entry.size,
                    "mtime_ns": entry.mtime_ns,
                    "mode": entry.mode,
                },
            )
            action = answer.get("action")
            if action == "skip":
                self._skipped(entry.rel_path, entry.size, str(answer.get("reason", "")))
                return
            if action == "error":
                self._failed(entry.rel_path, answer.get("error") or {})
                return
            file_id, offset = int(answer["file"]), int(answer["offset"])
            try:
                digest = await self._send_bytes(entry, file_id, offset)
                result = await self.client.call(
                    "POST", f"/files/{file_id}/commit", {"digest": digest}
                )
            except ChecksumMismatch as exc:
                # A resumed partial that did not match: the server dropped it; once more
                # from zero, then give up on this file.
                if attempt == 0 and offset > 0:
                    continue
                self._failed(entry.rel_path, exc.to_dict())
                return
            except SlipstreamError as exc:
                if exc.retryable and isinstance(exc, NetworkError):
                    raise
                self._failed(entry.rel_path, exc.to_dict())
                return
            self._done(entry.rel_path, entry.size, str(result.get("digest", "")), None)
            return

    async def _send_bytes(self, entry: SourceEntry, file_id: int, offset: int) -> str:
        """Send the file from ``offset``; returns its digest (prefix included)."""
        hasher = new_digest()
        try:
            fd = os.open(entry.local_path, os.O_RDONLY)
        except OSError as exc:
            raise _as_error(exc, entry.local_path, "read") from None
        try:
            hashed = await self._hash_prefix(fd, hasher, offset)
            position = offset
            failures = 0
            while position < entry.size:
                data = await asyncio.to_thread(
                    os.pread, fd, min(CHUNK_BYTES, entry.size - position), position
                )
                if not data:
                    raise _as_error(
                        OSError(5, "file shrank while sending"), entry.local_path, "read"
                    )
                if position + len(data) > hashed:  # a re-sent range is hashed only once
                    hasher.update(data[hashed - position :])
                    hashed = position + len(data)
                try:
                    position = await self.client.put_range(file_id, position, data, entry.size)
                    self.moved += len(data)
                    failures = 0
                except NetworkError:
                    failures += 1
                    if failures > RETRIES:
                        raise
                    await asyncio.sleep(min(0.25 * 2**failures, 4.0))
                    status = await self.client.call("GET", f"/files/{file_id}/status")
                    position = int(status["received"])  # resume where the server is
        except OSError as exc:
            raise _as_error(exc, entry.local_path, "read") from None
        finally:
            os.close(fd)
        return hasher.hexdigest()

    @staticmethod
    async def _hash_prefix(fd: int, hasher: Any, offset: int) -> int:
        position = 0
        while position < offset:
            data = await asyncio.to_thread(
                os.pread, fd, min(CHUNK_BYTES, offset - position), position
            )
            if not data:
                break
            hasher.update(data)
            position += len(data)
        return position

    # --- downloads -----------------------------------------------------------------------

    async def download(self, manifest: list[dict[str, Any]], resolver: DestinationResolver) -> None:
        self.expected = sum(int(item.get("size", 0)) for item in manifest if item["kind"] == "file")
        for item in manifest:
            rel = str(item["path"])
            try:
                if item["kind"] == "dir":
                    resolver.path_for(rel, kind="dir").mkdir(parents=True, exist_ok=True)
                    self.totals.dirs += 1
                    continue
                await self._download_file(item, resolver)
            except SlipstreamError as exc:
                if isinstance(exc, NetworkError):
                    raise
                self._failed(rel, exc.to_dict())
                await self._report(item, {"status": "failed", "error": exc.to_dict()})
            except OSError as exc:
                error = _as_error(exc, Path(rel), "write")
                self._failed(rel, error.to_dict())
                await self._report(item, {"status": "failed", "error": error.to_dict()})

    async def _download_file(self, item: dict[str, Any], resolver: DestinationResolver) -> None:
        rel, size, mtime_ns = str(item["path"]), int(item["size"]), int(item.get("mtime_ns", 0))
        final = resolver.path_for(rel, kind="file")
        reason = skip_reason(self.options.overwrite, final, size, mtime_ns)
        if reason:
            self._skipped(rel, size, reason)
            await self._report(item, {"status": "skipped", "reason": reason})
            return
        final = resolver.ensure_parent(rel)
        partial = final.with_name(final.name + self.options.partial_suffix)
        for attempt in range(2):
            offset = 0 if attempt else self._resume_offset(partial, size)
            await self._fetch(int(item["id"]), partial, offset, size)
            local = await asyncio.to_thread(file_digest, partial)
            remote = str((await self.client.call("GET", f"/files/{item['id']}/digest"))["digest"])
            if local == remote:
                break
            partial.unlink(missing_ok=True)
            if attempt or offset == 0:
                raise ChecksumMismatch(
                    f"{rel}: received bytes differ from the sender's",
                    internal_message=f"sender {remote}, receiver {local}",
                )
        if self.options.preserve_times and mtime_ns:
            os.utime(partial, ns=(mtime_ns, mtime_ns))
        os.replace(partial, final)
        self._done(rel, size, local, str(final))
        await self._report(item, {"status": "completed", "digest": local})

    def _resume_offset(self, partial: Path, size: int) -> int:
        # Only a partial shorter than the file is a prefix we wrote; the UDP path pre-sizes
        # its partials with holes, so a full-length one says nothing. The digest decides.
        if self.spec.resume == "none":
            return 0
        with contextlib.suppress(OSError):
            held = partial.stat().st_size
            if 0 < held < size:
                return held
        return 0

    async def _fetch(self, file_id: int, partial: Path, offset: int, size: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | (0 if offset else os.O_TRUNC)
        fd = os.open(partial, flags, 0o644)
        position = offset
        try:
            os.ftruncate(fd, offset)

            async def write(chunk: bytes) -> None:
                nonlocal position
                os.pwrite(fd, chunk, position)
                position += len(chunk)
                self.moved += len(chunk)

            failures = 0
            while True:
                try:
                    await self.client.download(file_id, position, write)
                    break
                except NetworkError:
                    failures += 1
                    if failures > RETRIES:
                        raise
                    await asyncio.sleep(min(0.25 * 2**failures, 4.0))
        finally:
            os.close(fd)
        if position != size:
            raise NetworkError(f"{partial.name}: got {position} of {size} bytes")

    async def _report(self, item: dict[str, Any], body: dict[str, Any]) -> None:
        with contextlib.suppress(SlipstreamError):  # bookkeeping must not fail the file
            await self.client.call("POST", f"/files/{item['id']}/done", body)

    # --- events ----------------------------------------------------------------------------

    def _done(self, rel: str, size: int, digest: str, local: str | None) -> None:
        self.totals.files_done += 1
        self.totals.bytes_files += size
        event = {"type": "file_done", "path": rel, "size": size, "digest": digest}
        self.emit({**event, "transport": "http", **({"file": local} if local else {})})

    def _skipped(self, rel: str, size: int, reason: str) -> None:
        self.totals.files_skipped += 1
        self.emit(
            {
                "type": "file_skipped",
                "path": rel,
                "size": size,
                "reason": reason,
                "transport": "http",
            }
        )

    def _failed(self, rel: str, error: dict[str, Any]) -> None:
        self.totals.files_failed += 1
        self.totals.errors.append(error)
        self.emit({"type": "file_error", "path": rel, "error": error, "transport": "http"})

    async def report_progress(self, interval: float) -> None:
        last_bytes, last_time = 0, time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            rate = (self.moved - last_bytes) * 8 / max(now - last_time, 1e-6)
            last_bytes, last_time = self.moved, now
            self.emit(
                {
                    "type": "progress",
                    "transport": "http",
                    "bytes": self.moved,
                    "rate_bps": rate,
                    "files_done": self.totals.files_done,
                    "files_skipped": self.totals.files_skipped,
                    "files_failed": self.totals.files_failed,
                    "bytes_expected": self.expected,
                    "elapsed_s": round(self.totals.elapsed, 3),
                }
            )


def skip_reason(policy: str, final: Path, size: int, mtime_ns: int) -> str:
    """Why an existing destination is kept; "" to write it. The UDP receiver's rules."""
    try:
        existing = final.stat()
    except FileNotFoundError:
        return ""
    if policy == "never":
        return "exists"
    same = existing.st_size == size and abs(existing.st_mtime_ns - mtime_ns) < 1_000_000_000
    if policy == "diff" and same:
        return "identical"
    if policy in ("older", "diff+older") and existing.st_mtime_ns >= mtime_ns:
        return "newer_or_same"
    return ""


def _as_error(exc: OSError, path: Path, action: str) -> SlipstreamError:
    error = os_error_to_slipstream(exc, path, action)
    return error if isinstance(error, SlipstreamError) else SlipstreamError(str(error))
