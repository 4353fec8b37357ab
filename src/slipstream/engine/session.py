"""The file side of a session: the manifest, readiness, checksums and confirmations.

``SendDriver`` and ``RecvDriver`` run on whichever host holds the files or receives them
(the client for an upload, the server for a download). Each owns the control stream for the
session's data phase and a sans-IO core driven by an ``Endpoint``. The exchange, per file
(docs/protocol.md, "Control channel", has every field):

    sender   FILE(id, path, size, mtime)        -> receiver decides: skip, place, or resume
    receiver SUMS_REQ(id, ranges)               (only to compare content: resume, overwrite)
    sender   SUMS(id, sums)
    receiver READY(id, first_block, count, off) -> both append the same block run
      or     SKIP(id, reason)
    sender   FILE_END(id, digest)               (digest of the *whole* file, even resumed)
    receiver FILE_DONE(id, digest | error)      (after verifying and renaming)

A split file (multi_session_threshold) travels as one byte range per session: FILE carries
``range: [offset, length]`` besides the whole ``size``, READY's offset lies in the range,
FILE_END's digest covers the range, and SKIP / FILE_DONE say ``whole: true`` when the answer
settles the file as a whole (the one answer that counts it); the others concern their range.

The sender streams FILE messages ahead of the data within a window, the receiver answers
most of them at once, and both sides batch their messages into few SSH writes, so many
small files cost no round trip each. Only files that already exist at the destination
(or have a checkpointed partial) wait for a SUMS round trip, and those run concurrently.

The parts live in their own modules; this one gathers the names callers import:

    control_stream.py    ControlStream: JSON lines over the SSH channel, batched writes
    driver.py            Driver base, CoreWatch, until_done_or_failed, as_error
    totals.py            SessionTotals
    events.py            event fields both sides build alike (checksum, split ranges)
    sums.py              SUMS_REQ / SUMS: range checks, the receiver's content comparison
    send_driver.py       SendDriver: announcing, READY / SKIP / FILE_DONE, answering SUMS
    recv_driver.py       RecvDriver: folders, links, deciding, placing (READY / SKIP)
    recv_inspect.py      a FILE message and what the destination holds for it
    recv_finish.py       verifying, renaming and confirming received files (FILE_DONE)
    recv_checkpoints.py  the checkpoints of big files in flight
"""

from __future__ import annotations

from slipstream.engine.control_stream import ControlStream
from slipstream.engine.driver import CoreWatch
from slipstream.engine.events import add_checksum
from slipstream.engine.incoming import PARTIAL_SUFFIX, ReceiveOptions
from slipstream.engine.outgoing import SendOptions
from slipstream.engine.recv_driver import RecvDriver
from slipstream.engine.send_driver import MANIFEST_WINDOW, SendDriver, rate_change_kwargs
from slipstream.engine.sums import parse_ranges
from slipstream.engine.totals import SessionTotals

__all__ = [
    "MANIFEST_WINDOW",
    "PARTIAL_SUFFIX",
    "ControlStream",
    "CoreWatch",
    "ReceiveOptions",
    "RecvDriver",
    "SendDriver",
    "SendOptions",
    "SessionTotals",
    "add_checksum",
    "parse_ranges",
    "rate_change_kwargs",
]
