"""``slipstream doctor [user@]host``: what passes between here and a server, in plain words.

Four checks, each a real exchange with the server rather than a guess:

* **SSH** (tcp, ``ssh_port``): connect and read the SSH banner, then the host key;
* **UDP** (udp, ``fasp_port``): diagnostic probes the server echoes (transport/probe.py);
* **HTTPS fallback** (tcp, fallback port): a TLS handshake and ``GET /slipstream/v1/ping``;
* **path MTU**: probes of decreasing size with "don't fragment" set; the largest that makes
  the round trip is the biggest datagram the path carries.

Optionally (a user, ``SLIPSTREAM_PASSWORD`` and a trusted host key) it also logs in.
Each result says what is wrong and what to open.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
import time
from dataclasses import asdict, dataclass
from typing import Any

import asyncssh

from slipstream.server.tls import fingerprint_of_der
from slipstream.transport import probe
from slipstream.transport.http_fallback import BASE_PATH, url_host

IP_PMTUDISC_PROBE = 3  # set DF, ignore the cached path MTU: really try each size
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
MTU_CANDIDATES = (9000, 1500, 1492, 1480, 1460, 1420, 1400, 1280, 1200, 1024, 576)
DEFAULT_FALLBACK_PORT = 8443


@dataclass
class Check:
    name: str
    port: int | None
    status: str  # ok | blocked | closed | failed | skipped
    detail: str
    advice: str = ""
    rtt_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "skipped")


@dataclass
class Report:
    host: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "ok": self.ok, "checks": [asdict(c) for c in self.checks]}

    def text(self) -> str:
        lines = [f"Slipstream doctor: {self.host}"]
        for check in self.checks:
            port = f"{check.port}" if check.port is not None else "-"
            lines.append(f"  {check.name:<15} {port:>6}  {check.status.upper():<8} {check.detail}")
        advice = list(dict.fromkeys(c.advice for c in self.checks if c.advice))
        if advice:
            lines.append("What to do:")
            lines.extend(f"  - {text}" for text in advice)
        elif not self.ok:
            lines.append("Some checks failed: see the lines above.")
        else:
            lines.append("Everything a transfer needs passes.")
        return "\n".join(lines)


async def diagnose(
    host: str,
    *,
    ssh_port: int = 33001,
    fasp_port: int = 33001,
    fallback_port: int = DEFAULT_FALLBACK_PORT,
    timeout: float = 3.0,
    user: str | None = None,
    password: str | None = None,
    sshfp: str | None = None,
) -> Report:
    ssh, udp, https = await asyncio.gather(
        check_ssh(host, ssh_port, timeout),
        check_udp(host, fasp_port, timeout),
        check_https(host, fallback_port, timeout),
    )
    checks = [ssh, udp, https, await check_mtu(host, fasp_port, udp, timeout)]
    if user is not None:
        checks.append(await check_login(host, ssh_port, user, password, sshfp, ssh))
    _add_overall_advice(udp, https)
    return Report(host, checks)


def _add_overall_advice(udp: Check, https: Check) -> None:
    if udp.status != "ok" and https.status == "ok":
        udp.advice += (
            " Until then, transfers can use the HTTPS fallback, which passes here "
            '(http_fallback: true, or "force" to skip UDP).'
        )


# --- SSH -------------------------------------------------------------------------------


async def check_ssh(host: str, port: int, timeout: float) -> Check:
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        return _tcp_failure("SSH", host, port, exc, "ssh_port")
    rtt = (time.monotonic() - started) * 1000
    try:
        banner = await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, TimeoutError):
        banner = b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not banner.startswith(b"SSH-"):
        return Check(
            "SSH",
            port,
            "failed",
            "something answers, but it is not an SSH server",
            f"check that ssh_port {port} is the Slipstream server's SSH port",
            rtt,
        )
    detail = banner.decode("ascii", "replace").strip()
    with contextlib.suppress(OSError, asyncssh.Error, TimeoutError):
        key = await asyncio.wait_for(asyncssh.get_server_host_key(host, port), timeout)
        if key is not None:
            detail += f", host key {key.get_fingerprint('sha256')}"
    return Check("SSH", port, "ok", detail, rtt_ms=round(rtt, 2))


def _tcp_failure(name: str, host: str, port: int, exc: BaseException, setting: str) -> Check:
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return Check(
            name,
            port,
            "closed",
            f"nothing listens on tcp/{port} (connection refused)",
            f"start the server, or check that {setting} {port} is right",
        )
    if isinstance(exc, TimeoutError):
        return Check(
            name,
            port,
            "blocked",
            f"no answer on tcp/{port}: a firewall drops it",
            f"open tcp/{port} inbound on the server's firewall (and outbound here)",
        )
    if isinstance(exc, socket.gaierror):
        return Check(
            name,
            port,
            "failed",
            f"cannot resolve {host!r}: {exc.strerror}",
            "check the host name (and this machine's DNS)",
        )
    reason = getattr(exc, "strerror", None) or str(exc)
    return Check(name, port, "failed", f"cannot connect to tcp/{port}: {reason}")


# --- UDP --------------------------------------------------------------------------------


def _udp_socket(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(address)  # connected: ICMP "port unreachable" comes back as an error
    return sock


async def _round_trip(
    sock: socket.socket, size: int, timeout: float, tries: int = 3
) -> tuple[float | None, bool]:
    """RTT in ms of one probe of ``size`` UDP payload bytes (None: lost), and whether the
    host said "port unreachable"."""
    loop = asyncio.get_running_loop()
    nonce = os.urandom(probe.NONCE_BYTES)
    for number in range(tries):
        sent = time.monotonic()
        try:
            sock.send(probe.encode_request(number, nonce, size))
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                return None, False  # larger than this host's own interface allows
            if exc.errno == errno.ECONNREFUSED:
                return None, True
            raise
        deadline = sent + timeout / tries
        while (left := deadline - time.monotonic()) > 0:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 2048), left)
            except TimeoutError:
                break
            except ConnectionRefusedError:
                return None, True
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:  # ICMP "fragmentation needed" came back
                    return None, False
                raise
            reply = probe.decode_reply(data)
            if reply is not None and reply[1] == nonce:
                return (time.monotonic() - sent) * 1000, False
    return None, False


async def check_udp(host: str, port: int, timeout: float) -> Check:
    try:
        sock = _udp_socket(host, port)
    except OSError as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        return Check("UDP", port, "failed", f"cannot send to udp/{port}: {reason}")
    try:
        rtt, refused = await _round_trip(sock, 256, timeout, tries=6)
    except OSError as exc:
        return Check("UDP", port, "failed", f"udp/{port}: {exc.strerror or exc}")
    finally:
        sock.close()
    if rtt is not None:
        return Check("UDP", port, "ok", f"round trip {rtt:.1f} ms", rtt_ms=round(rtt, 2))
    if refused:
        return Check(
            "UDP",
            port,
            "closed",
            f"the host answered 'port unreachable' for udp/{port}",
            f"nothing listens on udp/{port}: check the server's fasp_port",
        )
    return Check(
        "UDP",
        port,
        "blocked",
        f"no reply to 6 probes in {timeout:g} s: a firewall drops UDP to port {port}",
        f"open udp/{port} inbound on the server's firewall (and outbound UDP here).",
    )


# --- path MTU -------------------------------------------------------------------------------


async def check_mtu(host: str, port: int, udp: Check, timeout: float) -> Check:
    if udp.status != "ok":
        return Check("path MTU", None, "skipped", "needs the UDP port")
    sock = _udp_socket(host, port)
    try:
        ipv6 = sock.family == socket.AF_INET6
        level, option = (
            (socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER)
            if ipv6
            else (socket.IPPROTO_IP, getattr(socket, "IP_MTU_DISCOVER", 10))
        )
        sock.setsockopt(level, option, IP_PMTUDISC_PROBE)
        overhead = 48 if ipv6 else 28  # IP + UDP headers: MTU is counted in IP bytes
        wait = max(0.3, 3 * (udp.rtt_ms or 100) / 1000)
        for mtu in MTU_CANDIDATES:
            rtt, _ = await _round_trip(sock, mtu - overhead, min(timeout, wait * 2), tries=2)
            if rtt is not None:
                return _mtu_result(mtu)
    except OSError as exc:
        return Check("path MTU", None, "failed", f"cannot probe: {exc.strerror or exc}")
    finally:
        sock.close()
    return Check("path MTU", None, "failed", "no probe size made the round trip")


def _mtu_result(mtu: int) -> Check:
    if mtu >= 1500:
        more = " (jumbo frames)" if mtu > 1500 else ""
        return Check("path MTU", None, "ok", f"datagrams of {mtu} bytes pass{more}")
    return Check(
        "path MTU",
        None,
        "ok",
        f"the path carries at most {mtu}-byte datagrams (less than 1500)",
        f"use dgram_size {mtu} in the transfer spec (slipstream send -Z {mtu})",
    )


# --- HTTPS fallback -------------------------------------------------------------------------


async def check_https(host: str, port: int, timeout: float) -> Check:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we report the fingerprint; trust is the client's job
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context), timeout
        )
    except ssl.SSLError as exc:
        return Check("HTTPS fallback", port, "failed", f"tcp/{port} answers, but not TLS: {exc}")
    except (OSError, TimeoutError) as exc:
        return _tcp_failure("HTTPS fallback", host, port, exc, "the fallback port")
    rtt = (time.monotonic() - started) * 1000
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True) or b""
        request = (
            f"GET {BASE_PATH}/ping HTTP/1.1\r\nHost: {url_host(host)}:{port}\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(request.encode("ascii"))
        answer = await asyncio.wait_for(reader.read(4096), timeout)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return Check("HTTPS fallback", port, "failed", f"tcp/{port}: no HTTP answer ({exc})")
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    if b" 200 " not in answer.split(b"\r\n", 1)[0] or b"slipstream" not in answer:
        return Check(
            "HTTPS fallback",
            port,
            "failed",
            f"tcp/{port} speaks TLS but is not a Slipstream fallback server",
            f"check the server's [http_fallback] port ({port})",
        )
    detail = f"answers, certificate {fingerprint_of_der(der)}"
    return Check("HTTPS fallback", port, "ok", detail, rtt_ms=round(rtt, 2))


# --- login ------------------------------------------------------------------------------------


async def check_login(
    host: str, port: int, user: str, password: str | None, sshfp: str | None, ssh: Check
) -> Check:
    from slipstream.errors import HostKeyError, SlipstreamError
    from slipstream.transport.ssh import open_control_channel

    if ssh.status != "ok":
        return Check("login", port, "skipped", "needs the SSH port")
    if password is None:
        return Check("login", port, "skipped", f"no password for {user} (set SLIPSTREAM_PASSWORD)")
    try:
        channel = await open_control_channel(
            host, port, user, password=password, client_keys=[], sshfp=sshfp
        )
    except HostKeyError as exc:
        # Never send a password to a server whose key we cannot vouch for.
        return Check("login", port, "skipped", f"host key not trusted yet: {exc.user_message}")
    except SlipstreamError as exc:
        return Check("login", port, "failed", exc.user_message, "check the user and password")
    await channel.close()
    return Check("login", port, "ok", f"{user} logs in and opens a transfer channel")
