"""Content protection end to end: files encrypted at rest under a passphrase the server never
sees, decrypted on download or offline; wrong passphrases write nothing."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from slipstream.engine.envelope import envelope_size
from slipstream.engine.job import ClientOptions, transfer
from slipstream.engine.resume import CheckpointWriter, FileIdentity
from slipstream.errors import BadPassphrase
from tests.conftest import (
    ServerHandle,
    cli,
    connect_args,
    connection_spec,
    make_tree,
    password_env,
    tree_digest,
)

PASS = {"SLIPSTREAM_FILEPASS": "open sesame"}


def run(server: ServerHandle, verb: str, *args: str, cwd: Path, env: dict[str, str]):  # type: ignore[no-untyped-def]
    return cli(verb, *connect_args(server), *args, cwd=cwd, env={**password_env(server), **env})


def api(server: ServerHandle, cwd: Path, **fields: Any) -> list[dict[str, Any]]:
    spec = connection_spec(server, **fields)
    events: list[dict[str, Any]] = []
    asyncio.run(transfer(spec, events.append, ClientOptions(cwd=cwd)))
    return events


def test_round_trip_and_offline_decrypt(server: ServerHandle, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "local" / "tree", files=8, size=70_000)
    up = run(
        server, "send", "--file-crypt", "encrypt", "tree", "/", cwd=tmp_path / "local", env=PASS
    )
    assert up.returncode == 0, up.stderr
    stored = server.docroot / "tree"
    plain_files = {p.relative_to(tree) for p in tree.rglob("*") if p.is_file()}
    envelopes = {p.relative_to(stored) for p in stored.rglob("*") if p.is_file()}
    assert envelopes == {p.with_name(p.name + ".aspera-env") for p in plain_files}
    sample = tree / "sub0" / "deeper" / "file0.dat"
    sealed = (stored / "sub0/deeper/file0.dat.aspera-env").read_bytes()
    assert len(sealed) == envelope_size(sample.stat().st_size)
    assert sample.read_bytes()[:100] not in sealed
    assert "open sesame" not in server.log()

    down = run(server, "recv", "--file-crypt", "decrypt", "/tree", "back", cwd=tmp_path, env=PASS)
    assert down.returncode == 0, down.stderr
    assert tree_digest(tmp_path / "back") == tree_digest(tree)

    offline = cli(
        "decrypt",
        str(stored / "sub0/deeper/file0.dat.aspera-env"),
        "-o",
        str(tmp_path),
        env=PASS,
    )
    assert offline.returncode == 0, offline.stderr
    assert (tmp_path / "file0.dat").read_bytes() == sample.read_bytes()


def test_wrong_passphrase_writes_nothing(server: ServerHandle, tmp_path: Path) -> None:
    make_tree(tmp_path / "tree", files=3)
    assert (
        run(
            server, "send", "--file-crypt", "encrypt", "tree", "/", cwd=tmp_path, env=PASS
        ).returncode
        == 0
    )
    wrong = {"SLIPSTREAM_FILEPASS": "not the passphrase"}
    down = run(server, "recv", "--file-crypt", "decrypt", "/tree", "got", cwd=tmp_path, env=wrong)
    assert down.returncode == 1
    assert "Wrong passphrase" in down.stderr
    assert not (tmp_path / "got").exists()  # not a file, not even a folder
    envelope = next((server.docroot / "tree").rglob("*.aspera-env"))
    offline = cli("decrypt", str(envelope), "-o", str(tmp_path / "off"), env=wrong)
    assert offline.returncode == 1 and "code 49" in offline.stderr
    assert not (tmp_path / "off").exists() or not list((tmp_path / "off").iterdir())
    with pytest.raises(BadPassphrase):  # fail_bad_filepass: the whole session fails at once
        api(
            server,
            tmp_path,
            direction="receive",
            paths=[{"source": "/tree"}],
            destination_root="strict",
            create_dir=True,
            content_protection="decrypt",
            content_protection_passphrase="not the passphrase",
            fail_bad_filepass=True,
        )


def test_encrypted_upload_resumes_with_the_same_key(server: ServerHandle, tmp_path: Path) -> None:
    data = os.urandom(3_000_000)
    (tmp_path / "doc.bin").write_bytes(data)
    fields = {
        "direction": "send",
        "paths": [{"source": "doc.bin"}],
        "destination_root": "/",
        "content_protection": "encrypt",
        "content_protection_passphrase": "open sesame",
    }
    api(server, tmp_path, **fields)
    final = server.docroot / "doc.bin.aspera-env"
    envelope = final.read_bytes()
    # What a killed upload leaves: the first half of the envelope and its checkpoint.
    partial = server.docroot / "doc.bin.aspera-env.partial"
    partial.write_bytes(envelope[: len(envelope) // 2])
    mtime = (tmp_path / "doc.bin").stat().st_mtime_ns
    CheckpointWriter(partial, FileIdentity(len(envelope), mtime), len(envelope) // 2).close()
    final.unlink()
    events = api(server, tmp_path, **fields)
    done = next(e for e in events if e["type"] == "file_done")
    assert done["resumed_from"] == len(envelope) // 2
    assert final.read_bytes() == envelope  # same header and key: the same bytes
    # Another passphrase cannot continue that envelope: it starts over, under its own key.
    partial.write_bytes(envelope[: len(envelope) // 2])
    CheckpointWriter(partial, FileIdentity(len(envelope), mtime), len(envelope) // 2).close()
    final.unlink()
    other = api(server, tmp_path, **{**fields, "content_protection_passphrase": "other"})
    assert "resumed_from" not in next(e for e in other if e["type"] == "file_done")
    back = cli(
        "decrypt", str(final), "-o", str(tmp_path / "out"), env={"SLIPSTREAM_FILEPASS": "other"}
    )
    assert back.returncode == 0, back.stderr
    assert (tmp_path / "out" / "doc.bin").read_bytes() == data


def test_custom_extension_and_usage_errors(server: ServerHandle, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha")
    api(
        server,
        tmp_path,
        direction="send",
        paths=[{"source": "a.txt"}],
        destination_root="/",
        content_protection="encrypt",
        content_protection_passphrase="pw",
        content_protection_extension=".sealed",
    )
    assert (server.docroot / "a.txt.sealed").exists()
    events = api(
        server,
        tmp_path,
        direction="receive",
        paths=[{"source": "/a.txt.sealed"}],
        destination_root="plain.txt",
        content_protection="decrypt",
        content_protection_passphrase="pw",
        content_protection_extension=".sealed",
    )
    assert (tmp_path / "plain.txt").read_text() == "alpha", events
    no_pass = run(server, "send", "--file-crypt", "encrypt", "a.txt", "/", cwd=tmp_path, env={})
    assert no_pass.returncode == 2 and "SLIPSTREAM_FILEPASS" in no_pass.stderr
    wrong_way = run(
        server, "recv", "--file-crypt", "encrypt", "/a.txt.sealed", "x", cwd=tmp_path, env=PASS
    )
    assert wrong_way.returncode == 2 and "uploads" in wrong_way.stderr
