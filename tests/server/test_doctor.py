"""`slipstream doctor` against a healthy in-process server and against closed ports.
(A port dropped by a firewall is tests/e2e/test_fallback_netns.py.)"""

from __future__ import annotations

import socket

from slipstream.doctor import diagnose
from slipstream.transport import probe
from tests.server.conftest import PASSWORD, Stack


async def test_healthy_server_passes_every_check(stack: Stack) -> None:
    info = stack.info
    report = await diagnose(
        "127.0.0.1",
        ssh_port=info["ssh_port"],
        fasp_port=info["fasp_port"],
        fallback_port=info["fallback_port"],
        user="alice",
        password=PASSWORD,
        sshfp=info["sshfp"],
    )
    statuses = {check.name: check.status for check in report.checks}
    assert statuses == {
        "SSH": "ok",
        "UDP": "ok",
        "HTTPS fallback": "ok",
        "path MTU": "ok",
        "login": "ok",
    }, report.text()
    assert info["sshfp"] in report.text() and info["https_fallback_fingerprint"] in report.text()
    assert report.ok and "Everything a transfer needs passes" in report.text()


async def test_closed_ports_are_named(stack: Stack) -> None:
    closed = []
    for _ in range(2):  # two ports nothing listens on (bound, then released)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            closed.append(sock.getsockname()[1])
    report = await diagnose(
        "127.0.0.1", ssh_port=closed[0], fasp_port=closed[1], fallback_port=closed[0], timeout=1
    )
    assert not report.ok
    text = report.text()
    assert f"nothing listens on tcp/{closed[0]}" in text
    assert f"'port unreachable' for udp/{closed[1]}" in text


def test_probe_replies_never_amplify() -> None:
    assert probe.make_reply(b"\x53" * 10) is None  # too short to answer
    request = probe.encode_request(7, b"n" * 16, 64)
    reply = probe.make_reply(request)
    assert reply is not None and len(reply) < len(request)
    assert probe.decode_reply(reply) == (7, b"n" * 16, 64)
    assert probe.make_reply(reply + bytes(64)) is None  # a reply is never answered
