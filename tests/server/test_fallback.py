"""The HTTPS fallback in-process: forced, switched to after a UDP block, resumed by ranges.

The real firewall case (an nftables rule in a network namespace) is in
tests/e2e/test_fallback_netns.py; here the switch is triggered by making the data phase
report the block, which exercises the job's switch, the ACCEPT ticket and the records.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest

from slipstream.engine import job
from slipstream.engine.blockio import file_digest
from slipstream.engine.job import ClientOptions, transfer
from slipstream.errors import ChecksumMismatch, HostKeyError, TokenError, UdpBlocked
from slipstream.transport.http_fallback import FallbackClient
from tests.server.conftest import PASSWORD, Stack


def alice_spec(stack: Stack, **fields: Any) -> dict[str, Any]:
    return {
        "remote_host": "127.0.0.1",
        "remote_user": "alice",
        "remote_password": PASSWORD,
        "ssh_port": stack.info["ssh_port"],
        "sshfp": stack.info["sshfp"],
        "https_fallback_port": stack.info["fallback_port"],
        "https_fallback_fingerprint": stack.info["https_fallback_fingerprint"],
        **fields,
    }


async def run(spec: dict[str, Any], cwd: Path, events: list[dict[str, Any]] | None = None):  # type: ignore[no-untyped-def]
    sink = events if events is not None else []
    return await transfer(spec, sink.append, ClientOptions(cwd=cwd, progress_interval=0.05))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_forced_https_upload_and_download(stack: Stack, tmp_path: Path) -> None:
    local = tmp_path / "local"
    (local / "tree" / "sub").mkdir(parents=True)
    (local / "tree" / "sub" / "big.bin").write_bytes(os.urandom(9_000_000))
    (local / "tree" / "empty.txt").write_bytes(b"")
    events: list[dict[str, Any]] = []
    spec = alice_spec(
        stack, direction="send", http_fallback="force", paths=["tree"], destination_root="/"
    )
    result = await run(spec, local, events)
    assert result.ok and result.transport == "http"
    assert (stack.alice / "tree" / "sub" / "big.bin").read_bytes() == (
        local / "tree" / "sub" / "big.bin"
    ).read_bytes()
    assert (stack.alice / "tree" / "empty.txt").read_bytes() == b""
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["fallback", "session_start"] and kinds[-1] == "session_done"
    assert all(e.get("transport") == "http" for e in events if e["type"] != "fallback")
    assert not list(stack.alice.rglob("*.partial"))

    back = tmp_path / "back"
    spec = alice_spec(
        stack,
        direction="receive",
        http_fallback="force",
        paths=["tree"],
        destination_root=str(back),
    )
    result = await run(spec, tmp_path)
    assert result.ok and result.transport == "http" and result.totals.files_done == 2
    assert (back / "sub" / "big.bin").read_bytes() == (
        local / "tree" / "sub" / "big.bin"
    ).read_bytes()


async def test_udp_block_switches_to_https_with_the_ssh_ticket(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the SSH login, the ACCEPT carries a ticket: even key or token logins can
    continue over HTTPS, and the ops record shows both sessions."""

    async def blocked(*_args: Any) -> Any:
        raise UdpBlocked("No UDP reply (simulated firewall)")

    monkeypatch.setattr(job, "_data_phase", blocked)
    (stack.web / "inbox").mkdir()
    (tmp_path / "doc.bin").write_bytes(os.urandom(1_000_000))
    spec = await stack.api.setup("upload", destination_root="/inbox", paths=["doc.bin"])
    assert spec["http_fallback"] is True
    events: list[dict[str, Any]] = []
    result = await run(spec, tmp_path, events)
    assert result.transport == "http" and result.ok
    assert (stack.web / "inbox" / "doc.bin").read_bytes() == (tmp_path / "doc.bin").read_bytes()
    fallback = next(e for e in events if e["type"] == "fallback")
    assert "simulated firewall" in fallback["reason"]
    status, record = await stack.api.call(
        "GET", f"/ops/transfers/{spec['tags']['aspera']['xfer_id']}"
    )
    assert record["status"] == "completed" and record["transport"] == "http"
    assert [s["transport"] for s in record["sessions"]] == ["fasp", "http"]
    assert record["sessions"][1]["status"] == "completed"
    assert record["files"] == [
        {**record["files"][0], "path": "doc.bin", "status": "completed", "size": 1_000_000}
    ]

    # Without http_fallback the block is the error, as before.
    with pytest.raises(UdpBlocked):
        await run({**spec, "http_fallback": False}, tmp_path)


async def test_token_rules_hold_over_https(stack: Stack, tmp_path: Path) -> None:
    (stack.web / "inbox").mkdir()
    (tmp_path / "f.txt").write_text("f")
    spec = await stack.api.setup("upload", destination_root="/inbox", paths=["f.txt"])
    forced = {**spec, "http_fallback": "force"}
    assert (await run(forced, tmp_path)).transport == "http"
    with pytest.raises(TokenError, match="not '/'"):
        await run({**forced, "destination_root": "/"}, tmp_path)
    with pytest.raises(TokenError, match="altered"):
        await run({**forced, "token": spec["token"][:-4] + "AAAA"}, tmp_path)
    with pytest.raises(HostKeyError):
        wrong = "SHA256:" + base64.b64encode(bytes(32)).decode().rstrip("=")
        await run({**forced, "https_fallback_fingerprint": wrong}, tmp_path)


async def test_upload_resumes_by_byte_ranges(stack: Stack, tmp_path: Path) -> None:
    data = os.urandom(3_000_000)
    (tmp_path / "r.bin").write_bytes(data)
    client = FallbackClient(
        "127.0.0.1",
        stack.info["fallback_port"],
        authorization=basic("alice", PASSWORD),
        fingerprint=stack.info["https_fallback_fingerprint"],
    )
    spec = alice_spec(stack, direction="send", paths=["r.bin"], destination_root="/")
    async with client:
        await client.open_session(spec)
        announce = {"path": "r.bin", "size": len(data), "mtime_ns": 0}
        answer = await client.call("POST", "/files", announce)
        file_id = answer["file"]
        assert answer == {"action": "send", "file": file_id, "offset": 0}
        assert await client.put_range(file_id, 0, data[:1_000_000], len(data)) == 1_000_000
        # A gap is refused: the client must resume at what the server holds.
        with pytest.raises(Exception, match="416"):
            await client.put_range(file_id, 2_000_000, data[2_000_000:], len(data))
        # A retried announcement (after a lost answer) resumes where the file is.
        assert (await client.call("POST", "/files", announce))["offset"] == 1_000_000
        assert (await client.call("GET", f"/files/{file_id}/status"))["received"] == 1_000_000
        assert not (stack.alice / "r.bin").exists()
        assert await client.put_range(file_id, 1_000_000, data[1_000_000:], len(data)) == len(data)
        with pytest.raises(ChecksumMismatch):
            await client.call("POST", f"/files/{file_id}/commit", {"digest": "0" * 32})
        assert not (stack.alice / "r.bin").exists() and not (stack.alice / "r.bin.partial").exists()

    # A later run continues a partial it finds (shorter than the file), and checks it all.
    (stack.alice / "r.bin.partial").write_bytes(data[:1_234_567])
    sent: list[int] = []
    original = FallbackClient.put_range

    async def spy(self: FallbackClient, file_id: int, start: int, chunk: bytes, size: int) -> int:
        sent.append(start)
        return await original(self, file_id, start, chunk, size)

    forced = {**spec, "http_fallback": "force"}
    FallbackClient.put_range = spy  # type: ignore[method-assign]
    try:
        result = await run(forced, tmp_path)
    finally:
        FallbackClient.put_range = original  # type: ignore[method-assign]
    assert result.ok and sent[0] == 1_234_567
    assert (stack.alice / "r.bin").read_bytes() == data


async def test_download_resumes_and_a_bad_partial_is_redone(stack: Stack, tmp_path: Path) -> None:
    data = os.urandom(2_500_000)
    (stack.alice / "d.bin").write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    spec = alice_spec(
        stack,
        direction="receive",
        http_fallback="force",
        paths=["d.bin"],
        destination_root=str(out),
    )
    (out / "d.bin.partial").write_bytes(data[:1_000_000])
    assert (await run(spec, tmp_path)).ok
    assert (out / "d.bin").read_bytes() == data
    # A partial whose bytes are wrong: the digest catches it and the file is fetched again.
    (out / "d.bin").unlink()
    (out / "d.bin.partial").write_bytes(bytes(700_000))
    assert (await run(spec, tmp_path)).ok
    assert file_digest(out / "d.bin") == file_digest(stack.alice / "d.bin")
    assert not (out / "d.bin.partial").exists()
