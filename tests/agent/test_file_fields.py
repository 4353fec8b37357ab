"""Every file-semantics TransferSpec field, started through the agent's HTTP API the way the
SDK's startTransfer does, and checked where it matters: on disk, on the server, and in the
TransferInfo the page polls. Secrets never come back out nor reach the history in clear."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from slipstream.agent.app import Agent
from slipstream.server.tls import fingerprint_digest
from tests.agent.conftest import server_spec
from tests.agent.test_agent import Client, make_config
from tests.conftest import ServerHandle

PASSPHRASE = "correct horse battery staple 41"
FINISHED = ("completed", "failed")


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    agent = Agent(make_config(tmp_path / "agent"))
    await agent.start()
    async with aiohttp.ClientSession() as session:
        yield Client(agent, session)
    await agent.stop()


def picks(client: Client) -> Path:
    folder = client.agent.config.headless_folder
    assert folder is not None
    return folder


async def pick_folder(client: Client) -> None:
    status, answer = await client.post("windows/select-open-folder-dialog/")
    assert status == 200 and answer["dataTransfer"]["files"], answer


async def run(client: Client, spec: dict[str, Any], **settings: Any) -> dict[str, Any]:
    entry = {"transfer_spec": spec, "aspera_connect_settings": settings}
    status, answer = await client.post("transfers/start", {"transfer_specs": [entry]})
    assert status == 200, answer
    uuid = answer["transfer_specs"][0]["uuid"]
    return await client.wait(uuid, lambda t: t["status"] in FINISHED, timeout=30)


def by_name(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {Path(f["file"]).name: f for f in info["files"]}


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


async def refused(client: Client, spec: dict[str, Any], **settings: Any) -> dict[str, Any]:
    entry = {"transfer_spec": spec, "aspera_connect_settings": settings}
    status, answer = await client.post("transfers/start", {"transfer_specs": [entry]})
    assert status in (400, 406), (status, answer)
    error: dict[str, Any] = answer["error"]
    assert set(error) >= {"code", "internal_message", "user_message"}
    return error


async def test_overwrite_none_checksum_times_and_resume(
    client: Client, qs_server: ServerHandle
) -> None:
    landing = qs_server.docroot / "ow"
    landing.mkdir()
    (landing / "keep.txt").write_text("server copy\n")
    (picks(client) / "keep.txt").write_text("page copy\n")
    fresh = picks(client) / "fresh.bin"
    fresh.write_bytes(os.urandom(300_000))
    os.utime(fresh, (1_600_000_000, 1_500_000_000))
    await client.pick()
    spec = server_spec(
        qs_server,
        "send",
        paths=[{"source": str(picks(client) / "keep.txt")}, {"source": str(fresh)}],
        destination_root="/ow",
        overwrite="none",  # Connect's word for never
        file_checksum="sha-256",
        preserve_times=True,
        resume="attrs",
    )
    done = await run(client, spec)
    landed = (landing / "fresh.bin").stat()  # before reading it changes its access time
    assert done["status"] == "completed", done
    assert (landing / "keep.txt").read_text() == "server copy\n"
    assert (landing / "fresh.bin").read_bytes() == fresh.read_bytes()
    assert (landed.st_mtime, landed.st_atime) == (1_500_000_000, 1_600_000_000)
    counts = {"attempted": 2, "completed": 2, "failed": 0, "skipped": 1, "excluded": 0}
    assert done["file_counts"] == counts
    files = by_name(done)
    assert files["keep.txt"]["status"] == "skipped" and files["keep.txt"]["skip_reason"]
    assert files["fresh.bin"]["status"] == "completed"
    assert files["fresh.bin"]["checksum_type"] == "sha256"
    assert files["fresh.bin"]["checksum"] == hashlib.sha256(fresh.read_bytes()).hexdigest()
    shown = done["transfer_spec"]
    assert (shown["overwrite"], shown["resume"], shown["file_checksum"]) == (
        "never",
        "attributes",
        "sha256",
    )


async def test_filters_time_window_and_symlink_policy(
    client: Client, qs_server: ServerHandle
) -> None:
    source = picks(client) / "tree"
    (source / "sub").mkdir(parents=True)
    for name in ("a.txt", "b.tmp", "sub/c.txt", "sub/old.txt"):
        (source / name).write_text(name)
    os.utime(source / "sub" / "old.txt", (1_000_000_000, 1_000_000_000))
    (source / "link.txt").symlink_to("a.txt")
    await pick_folder(client)
    (qs_server.docroot / "flt").mkdir()
    spec = server_spec(
        qs_server,
        "send",
        paths=[{"source": str(source)}],
        destination_root="/flt",
        exclude_patterns=["*.tmp"],
        exclude_older_than="2010-01-01T00:00:00+00:00",
        symlink_policy="skip",
    )
    done = await run(client, spec)
    assert done["status"] == "completed", done
    assert tree(qs_server.docroot / "flt") == {"tree/a.txt", "tree/sub/c.txt"}
    assert done["file_counts"]["excluded"] == 2  # b.tmp by pattern, old.txt by age
    assert done["file_counts"]["skipped"] == 1  # the link


async def test_remove_and_move_after_transfer(client: Client, qs_server: ServerHandle) -> None:
    gone = picks(client) / "gone"
    (gone / "inner").mkdir(parents=True)
    (gone / "x.txt").write_text("x")
    (gone / "inner" / "y.txt").write_text("y")
    (picks(client) / "arch.txt").write_text("archived")
    await pick_folder(client)
    (qs_server.docroot / "rm").mkdir()
    removed = await run(
        client,
        server_spec(
            qs_server,
            "send",
            paths=[{"source": str(gone)}],
            destination_root="/rm",
            remove_after_transfer=True,
            remove_empty_directories=True,
        ),
    )
    assert removed["status"] == "completed", removed
    assert tree(qs_server.docroot / "rm") == {"gone/x.txt", "gone/inner/y.txt"}
    assert gone.is_dir() and list(gone.iterdir()) == []  # emptied; the named folder stays
    assert {f["source_action"] for f in removed["files"]} == {"removed"}

    moved = await run(
        client,
        server_spec(
            qs_server,
            "send",
            paths=[{"source": str(picks(client) / "arch.txt")}],
            destination_root="/rm",
            move_after_transfer="archive",  # relative to the source's (picked) folder
        ),
    )
    assert moved["status"] == "completed", moved
    assert not (picks(client) / "arch.txt").exists()
    assert (picks(client) / "archive" / "arch.txt").read_text() == "archived"
    assert by_name(moved)["arch.txt"]["source_moved_to"] == str(
        picks(client) / "archive" / "arch.txt"
    )


async def test_obfuscated_names_are_mapped_for_the_page(
    client: Client, qs_server: ServerHandle
) -> None:
    (picks(client) / "payroll-2025.csv").write_text("a,b\n")
    await client.pick()
    (qs_server.docroot / "obf").mkdir()
    spec = server_spec(
        qs_server,
        "send",
        paths=[{"source": str(picks(client) / "payroll-2025.csv")}],
        destination_root="/obf",
        obfuscate_file_names=True,
    )
    done = await run(client, spec)
    assert done["status"] == "completed", done
    stored = tree(qs_server.docroot / "obf")
    assert len(stored) == 1 and "payroll" not in next(iter(stored))
    entry = by_name(done)["payroll-2025.csv"]
    assert entry["stored_path"] in stored
    assert (qs_server.docroot / "obf" / entry["stored_path"]).read_text() == "a,b\n"


async def test_download_mirror_and_save_before_overwrite(
    client: Client, qs_server: ServerHandle
) -> None:
    remote = qs_server.docroot / "mirror"
    remote.mkdir()
    (remote / "a.txt").write_text("new a")
    (remote / "b.txt").write_text("b")
    local = client.agent.config.download_dir / "m" / "mirror"
    local.mkdir(parents=True)
    (local / "a.txt").write_text("old a")
    (local / "stale.txt").write_text("stale")
    spec = server_spec(
        qs_server,
        "receive",
        paths=[{"source": "/mirror"}],
        overwrite="always",
        save_before_overwrite=True,
        delete_before_transfer=True,
    )
    error = await refused(client, spec)  # the whole download folder: never mirrored
    assert error["code"] == 70 and "delete_before_transfer" in error["user_message"]
    done = await run(client, {**spec, "destination_root": "/m"})
    assert done["status"] == "completed", done
    saved = by_name(done)["a.txt"]["saved_as"]
    assert Path(saved).parent == local and Path(saved).read_text() == "old a"
    assert tree(local) == {"a.txt", "b.txt", Path(saved).name}  # stale.txt mirrored away
    assert (local / "a.txt").read_text() == "new a"


async def ops_record(server: ServerHandle, xfer_id: str) -> dict[str, Any]:
    info = server.info
    auth = {"Authorization": aiohttp.encode_basic_auth(info["api_user"], info["api_password"])}
    ssl = aiohttp.Fingerprint(fingerprint_digest(info["api_fingerprint"]))
    url = f"{info['api_url']}/ops/transfers/{xfer_id}"
    async with aiohttp.ClientSession() as http, http.get(url, headers=auth, ssl=ssl) as response:
        assert response.status == 200, await response.text()
        record: dict[str, Any] = await response.json()
        return record


def stored_bytes(data_dir: Path) -> bytes:
    """Everything the agent keeps on disk: the SQLite file, its log, its key."""
    return b"".join(p.read_bytes() for p in sorted(data_dir.iterdir()) if p.is_file())


async def test_content_protection_cookie_tags_and_no_secret_leaks(
    client: Client, qs_server: ServerHandle
) -> None:
    plain = picks(client) / "secret.txt"
    plain.write_text("the plaintext never reaches the server\n")
    await client.pick()
    (qs_server.docroot / "vault").mkdir()
    password = qs_server.info["password"]
    spec = server_spec(
        qs_server,
        "send",
        paths=[{"source": str(plain)}],
        destination_root="/vault",
        content_protection=True,  # the SDK's TypeScript type: a boolean
        content_protection_passphrase=PASSPHRASE,
        cookie="page-cookie-42",
        tags={"shop": {"order": 7}},
    )
    answers: list[str] = []
    status, started = await client.post(
        "transfers/start", {"transfer_specs": [{"transfer_spec": spec}]}
    )
    assert status == 200, started
    answers.append(json.dumps(started))
    up = started["transfer_specs"][0]["uuid"]
    done = await client.wait(up, lambda t: t["status"] in FINISHED, timeout=30)
    assert done["status"] == "completed", done
    envelope = qs_server.docroot / "vault" / "secret.txt.aspera-env"
    assert b"plaintext" not in envelope.read_bytes()
    assert tree(qs_server.docroot / "vault") == {"secret.txt.aspera-env"}
    assert by_name(done)["secret.txt"]["stored_path"] == "secret.txt.aspera-env"
    assert done["transfer_spec"]["content_protection"] == "encrypt"
    record = await ops_record(qs_server, up)  # the server's record carries the agent's uuid
    assert record["cookie"] == "page-cookie-42" and record["tags"]["shop"] == {"order": 7}
    answers.append(json.dumps(record))

    down = await run(
        client,
        server_spec(
            qs_server,
            "receive",
            paths=[{"source": "/vault/secret.txt.aspera-env"}],
            content_protection="decrypt",
            content_protection_passphrase=PASSPHRASE,
        ),
    )
    assert down["status"] == "completed", down
    assert (client.agent.config.download_dir / "secret.txt").read_text() == plain.read_text()

    answers.append(json.dumps(await client.info(up)))
    answers.append(json.dumps((await client.post("transfers/activity", {}))[1]))
    key = {"X-Slipstream-Key": client.agent.activity.key}
    async with client.session.get(
        f"{client.agent.url}/activity/api/transfers", headers=key
    ) as response:
        answers.append(await response.text())
    answers.append(json.dumps((await client.post(f"transfers/remove/{up}"))[1]))
    seen = "\n".join(answers)
    assert "page-cookie-42" in seen  # the check below looks at the right text
    assert PASSPHRASE not in seen and password not in seen
    on_disk = stored_bytes(client.agent.config.data_dir)
    assert PASSPHRASE.encode() not in on_disk and password.encode() not in on_disk


async def test_secrets_are_sealed_and_survive_a_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path / "agent", retry_attempts=1000, retry_interval=0.2)
    assert config.headless_folder is not None
    source = config.headless_folder / "later.txt"
    source.write_text("later")
    with socket.socket() as probe:  # a port nobody listens on: retried, never connected
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = {
        "direction": "send",
        "remote_host": "127.0.0.1",
        "remote_user": "someone",
        "remote_password": "hunter2-password",
        "ssh_port": port,
        "paths": [{"source": str(source)}],
        "content_protection": "encrypt",
        "content_protection_passphrase": PASSPHRASE,
    }
    agent = Agent(config)
    await agent.start()
    async with aiohttp.ClientSession() as session:
        client = Client(agent, session)
        await client.pick()
        uuid = await client.start(spec)
        await client.wait(uuid, lambda t: t["status"] == "willretry")
        # A resume's new secrets are checked like a spec's: a wrong type is a 400.
        status, answer = await client.post(
            f"transfers/resume/{uuid}", {"content_protection_passphrase": 12}
        )
        assert status == 400 and answer["error"]["code"] == 52, answer
    await agent.stop()
    on_disk = stored_bytes(config.data_dir)
    assert PASSPHRASE.encode() not in on_disk and b"hunter2" not in on_disk
    key_file = config.data_dir / "agent.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    agent = Agent(config)  # the sealed secrets come back for the transfer to resume
    await agent.start()
    try:
        record = agent.manager.records[uuid]
        assert record.secrets["content_protection_passphrase"] == PASSPHRASE
        assert record.engine_spec()["remote_password"] == "hunter2-password"
        agent.manager.remove(record)
        assert record.secrets == {}  # nothing kept for a transfer that cannot run again
    finally:
        await agent.stop()


async def test_clear_secrets_of_an_old_history_are_sealed_on_start(tmp_path: Path) -> None:
    config = make_config(tmp_path / "agent")
    agent = Agent(config)
    old = {
        "uuid": "0f0e0d0c-0000-4000-8000-000000000001",
        "app_id": "python-app",
        "seq": 1,
        "token": 1,
        "status": "failed",
        "connect_settings": {},
        "spec": {"direction": "send", "remote_host": "h", "remote_password": "legacy-pw-77"},
    }
    agent.store.save(old)  # as an agent before sealing wrote it: the secret in the spec
    agent.store.close()
    assert b"legacy-pw-77" in stored_bytes(config.data_dir)
    agent = Agent(config)
    await agent.start()
    try:
        record = agent.manager.records[str(old["uuid"])]
        assert record.secrets == {"remote_password": "legacy-pw-77"}
        assert "remote_password" not in record.spec
    finally:
        await agent.stop()
    assert b"legacy-pw-77" not in stored_bytes(config.data_dir)


async def test_invalid_fields_are_connect_errors_before_anything_runs(client: Client) -> None:
    source = picks(client) / "v.txt"
    source.write_text("v")
    await client.pick()
    base = {
        "direction": "send",
        "remote_host": "127.0.0.1",
        "remote_user": "u",
        "remote_password": "p",
        "paths": [{"source": str(source)}],
    }
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"overwrite": "sometimes"}, 52, "overwrite"),
        ({"resume": "maybe"}, 52, "resume"),
        ({"file_checksum": "crc32"}, 52, "file_checksum"),
        ({"symlink_policy": "bogus"}, 52, "symlink_policy"),
        ({"filters": ["*.tmp"]}, 52, "filters"),
        ({"exclude_newer_than": "last tuesday"}, 52, "exclude_newer_than"),
        ({"move_after_transfer": "/a", "remove_after_transfer": True}, 52, "move_after"),
        ({"delete_before_transfer": True, "multi_session": 2}, 53, "multi_session"),
        ({"direction": "receive", "content_protection": "encrypt"}, 53, "encrypt"),
        ({"content_protection_extension": "env"}, 53, "extension"),
        ({"move_after_transfer": "/etc/slipstream-archive"}, 70, "move_after_transfer"),
    ]
    for fields, code, word in cases:
        error = await refused(client, {**base, **fields})
        assert error["code"] == code and word in error["user_message"], (fields, error)
    no_dialogs = {**base, "content_protection": "encrypt"}
    error = await refused(client, no_dialogs, allow_dialogs=False)
    assert error["code"] == 53 and "passphrase" in error["user_message"]
    status, activity = await client.post("transfers/activity", {})
    assert activity["transfers"] == []  # nothing was queued
    # With dialogs allowed the agent asks; headless, nobody answers: a clear failure.
    failed = await run(client, no_dialogs)
    assert failed["status"] == "failed" and failed["error_code"] == 53
    assert "passphrase" in failed["error_desc"]
