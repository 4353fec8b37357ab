"""Comparing content across the link: SUMS_REQ and SUMS.

Where the overwrite or resume policy compares content, the receiver asks the sender for
checksums of a few byte ranges (``SUMS_REQ {id, ranges}``) and compares them with its own
(:class:`SumsExchange`); the sender checks the ranges (:func:`parse_ranges`) and answers
``SUMS {id, sums}``. The HTTPS fallback asks the same question over HTTP.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from slipstream.engine.control_stream import ControlStream
from slipstream.engine.digests import range_sums, range_sums_of_path, total_length
from slipstream.engine.driver import INLINE_HASH_LIMIT
from slipstream.engine.envelope import (
    HEADER_SIZE,
    ChunkCipher,
    EnvelopeHeader,
    EnvelopeView,
    Keyring,
    plain_file_reader,
)
from slipstream.errors import ContentProtectionError, ProtocolError
from slipstream.protocol import control

__all__ = ["SumsExchange", "envelope_sums", "open_peer_envelope", "parse_ranges", "sums_of_path"]


async def open_peer_envelope(
    keyring: Keyring, header_hex: Any, entry: Any, stored_path: str, peer: str
) -> tuple[EnvelopeHeader, Any]:
    """The header and key of the envelope the ``peer`` already stores for ``entry`` (a
    SourceEntry), opened with our passphrase: re-using them makes our envelope
    byte-identical to it, so content can be compared and a partial continued."""
    if not isinstance(header_hex, str):
        raise ContentProtectionError(f"The {peer} sent no envelope header to compare with")
    header = EnvelopeHeader.decode(bytes.fromhex(header_hex), stored_path)
    if header.plain_size != entry.size:
        raise ContentProtectionError("The stored envelope is of another file version")
    key = await asyncio.to_thread(keyring.open_header, header, stored_path)
    return header, key


async def envelope_sums(
    path: Path, header: EnvelopeHeader, key: Any, ranges: list[tuple[int, int]]
) -> list[str]:
    """Checksums of ``ranges`` of the envelope of the plain file ``path`` under ``header``."""

    def compute() -> list[str]:
        fd = os.open(path, os.O_RDONLY)
        try:
            view = EnvelopeView(ChunkCipher(header, key), plain_file_reader(fd))
            return range_sums(view.read, ranges)
        finally:
            os.close(fd)

    return await asyncio.to_thread(compute)


def parse_ranges(raw: Any, size: int) -> list[tuple[int, int]]:
    """Byte ranges from a peer: a short list of in-bounds (offset, length) pairs."""
    if not isinstance(raw, list) or len(raw) > 64:
        raise ProtocolError("Malformed checksum request", origin="remote")
    ranges: list[tuple[int, int]] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and all(type(v) is int for v in item)):
            raise ProtocolError("Malformed checksum range", origin="remote")
        offset, length = item
        if offset < 0 or length < 0 or offset + length > size:
            raise ProtocolError("Checksum range outside the file", origin="remote")
        ranges.append((offset, length))
    return ranges


async def sums_of_path(path: Path, ranges: list[tuple[int, int]]) -> list[str]:
    """Checksums of ``ranges`` of the file at ``path``: on the loop when short, else in a
    thread."""
    if total_length(ranges) <= INLINE_HASH_LIMIT:
        return range_sums_of_path(path, ranges)
    return await asyncio.to_thread(range_sums_of_path, path, ranges)


class SumsExchange:
    """The receiver's half: asks the sender for checksums and waits for its SUMS."""

    def __init__(self, ctl: ControlStream, *, encrypted_upload: bool) -> None:
        self._ctl = ctl
        self._encrypted_upload = encrypted_upload
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}

    async def same_content(self, file_id: int, path: Path, ranges: list[tuple[int, int]]) -> bool:
        """Ask the sender for checksums of ``ranges`` and compare them with ``path``'s.

        For an encrypted upload the request carries the stored envelope's header, so the
        sender produces the same envelope (and can continue it) if its passphrase opens it.
        """
        fields: dict[str, Any] = {"id": file_id, "ranges": [list(r) for r in ranges]}
        if self._encrypted_upload:
            with open(path, "rb") as handle:
                header = handle.read(HEADER_SIZE)
            if len(header) < HEADER_SIZE:
                return False
            fields["env_header"] = header.hex()
        reply = asyncio.get_running_loop().create_future()
        self._waiting[file_id] = reply
        self._ctl.send_nowait(control.SUMS_REQ, **fields)
        ours = await sums_of_path(path, ranges)
        answer = await reply
        return "error" not in answer and answer.get("sums") == ours

    def on_sums(self, msg: dict[str, Any]) -> None:
        """The sender's answer (SUMS) to one of our requests."""
        waiter = self._waiting.pop(int(msg["id"]), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)
