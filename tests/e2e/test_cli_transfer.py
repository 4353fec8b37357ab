"""End to end: the `slipstream` CLI against a real quickstart server over loopback."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import (
    ServerHandle,
    cli,
    connect_args,
    make_tree,
    password_env,
    tree_digest,
)


def send(server: ServerHandle, *args: str, cwd: Path, **kw: object):  # type: ignore[no-untyped-def]
    return cli("send", *connect_args(server), *args, cwd=cwd, env=password_env(server), **kw)


def recv(server: ServerHandle, *args: str, cwd: Path, **kw: object):  # type: ignore[no-untyped-def]
    return cli("recv", *connect_args(server), *args, cwd=cwd, env=password_env(server), **kw)


def test_send_file_and_tree(server: ServerHandle, tmp_path: Path) -> None:
    local = tmp_path / "local"
    make_tree(local / "tree")
    (local / "big.bin").write_bytes(os.urandom(5_000_000))
    result = send(server, "-d", "big.bin", "tree", "/up", cwd=local)
    assert result.returncode == 0, result.stderr
    assert "Completed:" in result.stdout
    up = server.docroot / "up"
    assert (up / "big.bin").read_bytes() == (local / "big.bin").read_bytes()
    assert tree_digest(up / "tree") == tree_digest(local / "tree")
    assert not list(up.rglob("*.partial"))
    assert "session user=" in server.log()


def test_recv_tree_single_source_rename(server: ServerHandle, tmp_path: Path) -> None:
    make_tree(server.docroot / "data", files=30)
    result = recv(server, "/data", "copy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # One source, destination absent but its parent present: the destination is the new name.
    assert tree_digest(tmp_path / "copy") == tree_digest(server.docroot / "data")


def test_recv_into_existing_folder(server: ServerHandle, tmp_path: Path) -> None:
    (server.docroot / "a.txt").write_text("alpha")
    (server.docroot / "b.txt").write_text("beta")
    (tmp_path / "dest").mkdir()
    result = recv(server, "/a.txt", "/b.txt", "dest", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "dest" / "a.txt").read_text() == "alpha"
    assert (tmp_path / "dest" / "b.txt").read_text() == "beta"


def test_file_pair_list_renames(server: ServerHandle, tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("first")
    (tmp_path / "two.txt").write_text("second")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("one.txt\nrenamed/uno.txt\ntwo.txt\nrenamed/dos.txt\n")
    result = send(server, "-d", "--file-pair-list", str(pairs), "/pairs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (server.docroot / "pairs/renamed/uno.txt").read_text() == "first"
    assert (server.docroot / "pairs/renamed/dos.txt").read_text() == "second"


def test_many_small_files_one_session(server: ServerHandle, tmp_path: Path) -> None:
    many = tmp_path / "many"
    many.mkdir()
    for index in range(1000):
        (many / f"f{index:04d}.txt").write_bytes(os.urandom(index % 2048))
    result = send(server, "--json-events", "many", "/", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert sum(1 for e in events if e["type"] == "session_start") == 1
    assert tree_digest(server.docroot / "many") == tree_digest(many)


def test_json_events_report_files_and_totals(server: ServerHandle, tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(os.urandom(200_000))
    result = send(server, "--json-events", "x.bin", "/", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "session_start" and kinds[-1] == "session_done"
    done = next(e for e in events if e["type"] == "file_done")
    assert done["path"] == "x.bin" and done["size"] == 200_000 and len(done["digest"]) == 32
    assert events[-1]["files_done"] == 1 and events[-1]["bytes"] == 200_000


def test_unencrypted_and_aes256(server: ServerHandle, tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(os.urandom(300_000))
    for flags in (["-T"], ["-c", "aes-256"]):
        result = send(server, *flags, "--overwrite", "always", "f.bin", "/", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert (server.docroot / "f.bin").read_bytes() == (tmp_path / "f.bin").read_bytes()


def test_source_is_never_modified(server: ServerHandle, tmp_path: Path) -> None:
    src = tmp_path / "keep.bin"
    src.write_bytes(os.urandom(100_000))
    before = (src.read_bytes(), src.stat().st_mtime_ns)
    assert send(server, "keep.bin", "/", cwd=tmp_path).returncode == 0
    assert (src.read_bytes(), src.stat().st_mtime_ns) == before


# --- faults ------------------------------------------------------------------------------


def test_wrong_password(server: ServerHandle, tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    result = cli(
        "send",
        *connect_args(server),
        "f.txt",
        "/",
        cwd=tmp_path,
        env={"SLIPSTREAM_PASSWORD": "not-the-password"},
    )
    assert result.returncode == 1
    assert "authentication failed" in result.stderr.lower() and "code 19" in result.stderr
    assert not (server.docroot / "f.txt").exists()


def test_unknown_host_key_refused_then_accepted(server: ServerHandle, tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    info = server.info
    base = [
        "--host",
        info["host"],
        "--user",
        info["user"],
        "-P",
        str(info["ssh_port"]),
        "-O",
        str(info["fasp_port"]),
    ]
    refused = cli("send", *base, "f.txt", "/", cwd=tmp_path, env=password_env(server))
    assert refused.returncode == 1 and "code 51" in refused.stderr
    assert info["sshfp"] in refused.stderr  # tells the user what to check
    accepted = cli(
        "send", *base, "--accept-host-key", "f.txt", "/", cwd=tmp_path, env=password_env(server)
    )
    assert accepted.returncode == 0, accepted.stderr
    again = cli(
        "send", *base, "--overwrite", "always", "f.txt", "/", cwd=tmp_path, env=password_env(server)
    )
    assert again.returncode == 0, again.stderr


def test_wrong_pinned_host_key(server: ServerHandle, tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    args = connect_args(server)
    args[args.index("--sshfp") + 1] = "SHA256:" + "A" * 43
    result = cli("send", *args, "f.txt", "/", cwd=tmp_path, env=password_env(server))
    assert result.returncode == 1 and "code 51" in result.stderr


def test_nothing_listening(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "f.txt").write_text("x")
    result = cli(
        "send",
        "--host",
        "127.0.0.1",
        "--user",
        "u",
        "-P",
        str(port),
        "f.txt",
        "/",
        cwd=tmp_path,
        env={"SLIPSTREAM_PASSWORD": "p"},
    )
    assert result.returncode == 1
    assert "code 13" in result.stderr and str(port) in result.stderr


def test_missing_source(server: ServerHandle, tmp_path: Path) -> None:
    result = send(server, "does-not-exist.bin", "/", cwd=tmp_path)
    assert result.returncode == 1
    assert "code 43" in result.stderr and "does-not-exist.bin" in result.stderr


def test_download_docroot_escape_refused(server: ServerHandle, tmp_path: Path) -> None:
    outside = server.root / "secret.txt"
    outside.write_text("outside the docroot")
    result = recv(server, "/../secret.txt", "got", cwd=tmp_path)
    assert result.returncode == 1 and "code 41" in result.stderr
    assert not (tmp_path / "got").exists()


def test_upload_docroot_escape_refused(server: ServerHandle, tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    result = send(server, "f.txt", "/../escaped", cwd=tmp_path)
    assert result.returncode == 1 and "code 41" in result.stderr
    assert not (server.root / "escaped").exists()


def test_symlink_out_of_docroot_refused(server: ServerHandle, tmp_path: Path) -> None:
    (server.root / "private").mkdir()
    (server.root / "private" / "key.txt").write_text("secret")
    (server.docroot / "link").symlink_to(server.root / "private")
    result = recv(server, "/link/key.txt", "stolen.txt", cwd=tmp_path)
    assert result.returncode == 1 and "code 41" in result.stderr
    assert not (tmp_path / "stolen.txt").exists()


def test_bad_spec_is_a_usage_error(tmp_path: Path) -> None:
    result = cli(
        "send",
        "--host",
        "127.0.0.1",
        "--user",
        "u",
        "--policy",
        "fixed",
        "-l",
        "fast",
        "a",
        "/",
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "rate" in result.stderr
    assert "Traceback" not in result.stderr


def test_existing_file_not_replaced_by_default_when_identical(
    server: ServerHandle, tmp_path: Path
) -> None:
    (tmp_path / "same.txt").write_text("same")
    assert send(server, "-p", "same.txt", "/", cwd=tmp_path).returncode == 0
    result = send(server, "--json-events", "same.txt", "/", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    kinds = [json.loads(line)["type"] for line in result.stdout.splitlines()]
    assert "file_skipped" in kinds


def test_copy_is_identical_even_with_a_stale_partial(server: ServerHandle, tmp_path: Path) -> None:
    data = os.urandom(400_000)
    (tmp_path / "p.bin").write_bytes(data)
    (server.docroot / "p.bin.partial").write_bytes(os.urandom(900_000))  # longer, stale
    assert send(server, "p.bin", "/", cwd=tmp_path).returncode == 0
    assert (server.docroot / "p.bin").read_bytes() == data
    assert not (server.docroot / "p.bin.partial").exists()
