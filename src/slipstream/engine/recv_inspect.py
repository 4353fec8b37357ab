"""What the receiver makes of a FILE announcement before deciding anything: the message
checked and turned into an :class:`~slipstream.engine.incoming.IncomingFile`, the envelope
header of a file to decrypt opened, and what the destination already holds for it.

The decision itself (skip, replace, resume) is the driver's, by the rules of
engine/overwrite.py and engine/resume.py.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

from slipstream.engine.blockio import refuse_symlink
from slipstream.engine.envelope import EnvelopeHeader, Keyring
from slipstream.engine.incoming import IncomingFile, ReceiveOptions
from slipstream.engine.paths import DestinationResolver
from slipstream.engine.resume import CheckpointRecord, read_checkpoint
from slipstream.errors import ContentProtectionError, PathError, ProtocolError
from slipstream.protocol import control

__all__ = ["OnDisk", "inspect_destination", "open_envelope_header", "parse_file_message"]


@dataclass
class OnDisk:
    """What the destination already holds for an announced file."""

    final: os.stat_result | None
    partial: bool
    record: CheckpointRecord | None


def parse_file_message(msg: dict[str, Any], options: ReceiveOptions) -> IncomingFile:
    """The announced file of a FILE message (an envelope to decrypt loses its extension)."""
    file_id, rel, size = int(msg["id"]), str(msg["path"]), int(msg["size"])
    if size < 0:
        raise ProtocolError(f"Negative size announced for {rel!r}", origin="remote")
    atime = msg.get("atime_ns")
    incoming = IncomingFile(
        file_id, rel, rel, size, int(msg.get("mtime_ns", 0)), int(atime) if atime else None
    )
    ext = options.extension
    if options.keyring is not None and rel.endswith(ext) and len(rel) > len(ext):
        incoming.dest_rel = rel[: -len(ext)]
        try:
            incoming.env_header = bytes.fromhex(str(msg.get("env_header") or ""))
        except ValueError:
            raise ProtocolError("Malformed envelope header", origin="remote") from None
    if msg.get(control.RANGE_FIELD) is not None:
        incoming.piece = _parse_piece(msg[control.RANGE_FIELD], size, options)
    return incoming


def _parse_piece(raw: Any, size: int, options: ReceiveOptions) -> tuple[int, int]:
    """A split file's range from the peer: in bounds, not empty, not an envelope."""
    if options.keyring is not None or options.encrypted_upload:
        raise ProtocolError("An envelope cannot be received as a range", origin="remote")
    if not (isinstance(raw, list) and len(raw) == 2 and all(type(v) is int for v in raw)):
        raise ProtocolError("Malformed file range", origin="remote")
    offset, length = raw
    if offset < 0 or length <= 0 or offset + length > size:
        raise ProtocolError("File range outside the file", origin="remote")
    return offset, length


def inspect_destination(
    incoming: IncomingFile, resolver: DestinationResolver, partial_suffix: str
) -> OnDisk:
    """Set ``incoming``'s final and partial paths and look at what is there already."""
    final = resolver.path_for(incoming.dest_rel, kind="file")
    incoming.final = final
    incoming.partial = final.with_name(final.name + partial_suffix)
    try:
        final_st: os.stat_result | None = os.lstat(final)
    except FileNotFoundError:
        final_st = None
    if final_st is not None and final_st.st_mode & 0o170000 == 0o040000:
        raise PathError(f"{incoming.dest_rel}: a folder is in the way of this file")
    partial = os.path.lexists(incoming.partial)
    if partial:
        refuse_symlink(incoming.partial)  # a planted link: never read, sized or written
    at = incoming.start if incoming.piece is not None else None
    record = read_checkpoint(incoming.partial, at) if partial else None
    return OnDisk(final_st, partial, record)


async def open_envelope_header(incoming: IncomingFile, keyring: Keyring | None) -> None:
    """A file to decrypt: check the passphrase now, before any byte of it travels."""
    assert keyring is not None and incoming.env_header is not None
    header = EnvelopeHeader.decode(incoming.env_header, incoming.rel_path)
    if header.envelope_size != incoming.size:
        raise ContentProtectionError(f"{incoming.rel_path}: size does not match its header")
    await asyncio.to_thread(keyring.open_header, header, incoming.rel_path)
    incoming.plain_size = header.plain_size
