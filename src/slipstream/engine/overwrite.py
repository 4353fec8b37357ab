"""What a receiver does with an announced file that already exists: one rule, every transport.

The UDP receiver (``RecvDriver``, engine/recv_driver.py) and both ends of the HTTPS fallback
(engine/fallback.py receives downloads, server/fallback.py uploads) call :func:`skip_reason`
and nothing else, so ``overwrite`` and ``resume`` mean the same whichever transport carries
the bytes; the fallback continues partial files with :func:`resume_offset`, the rule of
``RecvDriver._resume_offset``. The policy tables are in engine/resume.py; this adds what only
the receiver knows (decryption, the content of the file it holds) on top.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from slipstream.engine.envelope import HEADER_SIZE
from slipstream.engine.incoming import ReceiveOptions
from slipstream.engine.resume import (
    ByteRange,
    CheckpointRecord,
    FileIdentity,
    Verdict,
    decide_existing,
    decide_partial,
)
from slipstream.errors import DestinationExists

# Compares byte ranges of the file at the destination with the sender's (a round trip).
SameContent = Callable[[list[ByteRange]], Awaitable[bool]]


async def skip_reason(
    options: ReceiveOptions,
    existing: os.stat_result,
    announced: FileIdentity,
    same_content: SameContent,
    *,
    decrypt: bool = False,
) -> str:
    """Why to keep the file already at the destination ("" = replace it).

    ``announced`` is what the file will be once received: for an envelope to decrypt, its
    plaintext size. Decrypting, the receiver holds plaintext while the sender holds envelopes,
    so their bytes cannot be compared: the checksum policies fall back to attributes.
    ``same_content`` is asked only when the policy compares content and the sizes agree.
    """
    resume = options.resume
    if decrypt and resume != "none":
        resume = "attributes"
    dest = FileIdentity(existing.st_size, existing.st_mtime_ns)
    decision = decide_existing(options.overwrite, resume, dest, announced)
    if decision.verdict is Verdict.SKIP:
        return decision.reason
    if decision.verdict is Verdict.REPLACE:
        return ""
    return decision.reason if await same_content(list(decision.ranges)) else ""


def overwrite_refused(rel: str) -> DestinationExists:
    """The server's veto (``overwrite = false``): the same error on every transport."""
    return DestinationExists(f"{rel}: exists, and this server does not allow overwriting")


async def resume_offset(
    options: ReceiveOptions,
    record: CheckpointRecord | None,
    source: FileIdentity,
    same_content: SameContent,
) -> int:
    """Where to continue the partial file described by ``record`` (0: from the start).

    The checksum policies compare the prefix with the sender's first; an envelope being
    received is always compared, since the sender can continue it only under the header
    already on disk (the exchange carries it), which must be complete.
    """
    decision = decide_partial(options.resume, record, source)
    if decision.offset == 0:
        return 0
    if options.encrypted_upload and decision.offset < HEADER_SIZE:
        return 0
    if decision.ranges or options.encrypted_upload:
        return decision.offset if await same_content(list(decision.ranges)) else 0
    return decision.offset
