"""A receiver's own files are never opened through a symbolic link (engine/blockio.py).

Each writer of a receiver-side file meets a link planted under its name, pointing to a file
"outside": the open fails with ELOOP (DocrootViolation once typed), and the outside file
keeps every byte and its size.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from slipstream.engine.blockio import (
    FileBlockSink,
    FileSlot,
    open_nofollow,
    os_error_to_slipstream,
    refuse_symlink,
    symlink_refused,
    truncate_nofollow,
)
from slipstream.engine.envelope import Keyring, decrypt_file, encrypt_file
from slipstream.engine.incoming import (
    DECRYPT_SUFFIX,
    IncomingFile,
    ReceiveOptions,
    _decrypt,
    size_shared_partial,
)
from slipstream.engine.resume import (
    CheckpointWriter,
    FileIdentity,
    RangeRecord,
    checkpoint_path,
    ranges_path,
    read_checkpoint,
)
from slipstream.errors import DocrootViolation

SECRET = b"outside the docroot\n" * 50


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    target = tmp_path / "outside" / "secret.txt"
    target.parent.mkdir()
    target.write_bytes(SECRET)
    return target


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    folder = tmp_path / "dest"
    folder.mkdir()
    return folder


def _plant(link: Path, target: Path) -> Path:
    os.symlink(target, link)
    return link


def _untouched(target: Path) -> None:
    assert target.read_bytes() == SECRET


def _eloop(action: Callable[[], object]) -> OSError:
    with pytest.raises(OSError) as info:
        action()
    assert info.value.errno == errno.ELOOP
    return info.value


# --- the helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        os.O_WRONLY | os.O_CREAT,
        os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
        os.O_RDWR | os.O_CREAT,
        os.O_WRONLY,
        os.O_RDONLY,
    ],
    ids=["create", "create-truncate", "read-write-create", "write", "read"],
)
def test_open_nofollow_refuses_a_link(dest: Path, outside: Path, flags: int) -> None:
    link = _plant(dest / "X.partial", outside)
    _eloop(lambda: open_nofollow(link, flags))
    _untouched(outside)
    assert link.is_symlink()  # left as it was: not ours to remove


def test_open_nofollow_refuses_a_dangling_link(dest: Path, tmp_path: Path) -> None:
    missing = tmp_path / "outside-new.txt"
    link = _plant(dest / "X.partial", missing)
    _eloop(lambda: open_nofollow(link, os.O_WRONLY | os.O_CREAT))
    assert not missing.exists()  # O_CREAT did not create the link's target


def test_open_nofollow_opens_regular_files(dest: Path) -> None:
    fd = open_nofollow(dest / "X.partial", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"abc")
    finally:
        os.close(fd)
    assert (dest / "X.partial").read_bytes() == b"abc"
    assert (dest / "X.partial").stat().st_mode & 0o777 == 0o600


def test_truncate_nofollow(dest: Path, outside: Path) -> None:
    link = _plant(dest / "X.partial", outside)
    _eloop(lambda: truncate_nofollow(link, 0))
    _eloop(lambda: truncate_nofollow(link, 10 * len(SECRET)))
    _untouched(outside)
    regular = dest / "Y.partial"
    regular.write_bytes(b"0123456789")
    truncate_nofollow(regular, 4)
    assert regular.read_bytes() == b"0123"


def test_refuse_symlink(dest: Path, outside: Path) -> None:
    refuse_symlink(dest / "missing")
    (dest / "regular").write_bytes(b"x")
    refuse_symlink(dest / "regular")
    error = _eloop(lambda: refuse_symlink(_plant(dest / "X.partial", outside)))
    assert error.filename == str(dest / "X.partial")


def test_eloop_becomes_a_docroot_violation_naming_the_link(dest: Path, outside: Path) -> None:
    link = _plant(dest / "X.bin.partial", outside)
    error = _eloop(lambda: open_nofollow(link, os.O_WRONLY | os.O_CREAT))
    typed = os_error_to_slipstream(error, Path("sub/X.bin"), "write")
    assert isinstance(typed, DocrootViolation) and typed.code == 41
    assert not typed.retryable
    assert typed.user_message == "X.bin.partial is a symbolic link: refused to write through it"
    # Only the name: a server's folders never reach the peer.
    body = typed.to_dict()
    assert str(dest) not in body["user_message"] + body["internal_message"]
    # Without a file name on the error, the caller's name for the file is used.
    bare = os_error_to_slipstream(OSError(errno.ELOOP, "loop"), Path("sub/Y"), "write")
    assert isinstance(bare, DocrootViolation) and "Y is a symbolic link" in bare.user_message
    assert symlink_refused("Z").code == DocrootViolation.code


# --- every writer of a receiver's file ----------------------------------------------------------


def test_block_sink_refuses_a_linked_partial(dest: Path, outside: Path) -> None:
    completed: list[int] = []
    sink = FileBlockSink(100, completed.append)
    link = _plant(dest / "X.partial", outside)
    sink.register(FileSlot(1, 0, 2, 0, 150), link)
    with pytest.raises(DocrootViolation, match=r"X\.partial is a symbolic link"):
        sink.write_block(0, memoryview(b"a" * 100))
        sink.write_block(1, memoryview(b"b" * 50))
    sink.close()
    _untouched(outside)
    empty = _plant(dest / "E.partial", outside)
    with pytest.raises(DocrootViolation):  # a zero-block file is created at register
        FileBlockSink(100, completed.append).register(FileSlot(2, 0, 0, 0, 0), empty)
    _untouched(outside)
    assert completed == []


def test_checkpoint_writer_refuses_a_linked_sidecar(dest: Path, outside: Path) -> None:
    partial = dest / "X.partial"
    _plant(checkpoint_path(partial), outside)
    _eloop(lambda: CheckpointWriter(partial, FileIdentity(1 << 21, 1), 0))
    _plant(checkpoint_path(partial, 1 << 20), outside)
    _eloop(lambda: CheckpointWriter(partial, FileIdentity(1 << 21, 1), 1 << 20, 1 << 20))
    _untouched(outside)


def test_range_record_refuses_a_linked_record(dest: Path, outside: Path) -> None:
    partial = dest / "X.partial"
    _plant(ranges_path(partial), outside)
    record = RangeRecord(partial, "job", FileIdentity(1 << 21, 1))
    _eloop(lambda: record.stamp(""))
    _eloop(lambda: record.settle(0, 1 << 20, "digest"))
    _eloop(record.note_failure)
    _untouched(outside)


def test_read_checkpoint_refuses_links(dest: Path, outside: Path) -> None:
    partial = dest / "X.partial"
    partial.write_bytes(bytes(100))
    CheckpointWriter(partial, FileIdentity(200, 1), 50).close()
    assert read_checkpoint(partial) is not None
    # A linked sidecar: refused, not read (nor taken as "no checkpoint", which would let a
    # writer create it through the link).
    checkpoint_path(partial).unlink()
    _plant(checkpoint_path(partial), outside)
    _eloop(lambda: read_checkpoint(partial))
    # A linked partial: refused before anything looks at what it points to.
    other = _plant(dest / "Y.partial", outside)
    _eloop(lambda: read_checkpoint(other))
    _untouched(outside)
    assert read_checkpoint(dest / "missing.partial") is None


@pytest.mark.parametrize("size", [0, len(SECRET) // 2, 4 * len(SECRET)])
def test_shared_partial_refuses_a_link(dest: Path, outside: Path, size: int) -> None:
    link = _plant(dest / "X.partial", outside)
    _eloop(lambda: size_shared_partial(link, size))
    _untouched(outside)


def test_decrypted_temporary_refuses_a_link(dest: Path, outside: Path) -> None:
    keyring = Keyring("correct horse battery staple")
    plain = dest / "plain.txt"
    plain.write_bytes(b"the plaintext")
    partial = dest / "X.partial"
    encrypt_file(plain, partial, keyring)
    _plant(partial.with_name(partial.name + DECRYPT_SUFFIX), outside)
    incoming = IncomingFile(1, "X.aspera-env", "X", partial.stat().st_size, 0, partial=partial)
    incoming.env_header = b"header"  # decrypt: only whether there is one matters here
    _eloop(lambda: _decrypt(incoming, ReceiveOptions(keyring=keyring)))
    _untouched(outside)
    # The offline tool's temporary as well, with the typed error.
    target = dest / "out.txt"
    _plant(target.with_name(target.name + ".slipstream-tmp"), outside)
    with pytest.raises(DocrootViolation, match=r"out\.txt\.slipstream-tmp is a symbolic link"):
        decrypt_file(partial, target, keyring)
    _untouched(outside)
    assert not target.exists()
