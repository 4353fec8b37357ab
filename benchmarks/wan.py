"""WAN benchmark: Slipstream next to scp, rsync and curl over the wanem emulator (root only).

    python3 benchmarks/wan.py                       # the whole matrix (hours)
    python3 benchmarks/wan.py --size 256M --tcp-cap 20 --cells 100/100/1,100/200/2

Every cell starts one wanem instance (two network namespaces joined by a userspace link:
rate, one-way delay RTT/2 each way, Bernoulli loss on the data direction a->b only, a
drop-tail queue of one BDP), runs every tool through it, and stops it again, so all tools
of a cell see the same path in the same run. Data always flows a -> b: Slipstream and scp
and rsync upload from a to b, curl downloads in b from an HTTP server in a. Each TCP tool
runs once with CUBIC and once with BBR (set in both namespaces) and is capped at
``--tcp-cap`` seconds; its rate is the bytes it moved over the time it ran. Slipstream's
rate is the file's bytes over the whole command, SSH login and handshake included.

Fairness cells (100 Mbit/s, 50 ms, no loss) run one iperf3 CUBIC flow for ``--share-time``
seconds next to Slipstream (fair, low, fixed 50 Mbit/s) and report both rates over the
same window, plus the RTT a ping sees while a fair flow runs alone.

Only one wanem may run on the machine: the script refuses to start if another is up,
and always takes its own instance down (``wanem down`` ends it by its PID file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

WANEM = Path(
    os.environ.get("WANEM", Path(__file__).resolve().parents[2] / "shared/tools/wanem/wanem")
)
A_ADDR, B_ADDR = "10.77.0.1", "10.77.0.2"
SSH_PORT, SLIP_SSH, SLIP_UDP, HTTP_PORT, IPERF_PORT = 2222, 33001, 33001, 8080, 5201

SSHD_CONFIG = """\
Port {port}
ListenAddress {addr}
HostKey {root}/ssh_host_ed25519_key
AuthorizedKeysFile {root}/authorized_keys
PidFile {root}/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin yes
Subsystem sftp internal-sftp
"""


@dataclass(frozen=True)
class Cell:
    rate_mbit: int
    rtt_ms: int
    loss_pct: float
    mtu: int = 1500

    @property
    def name(self) -> str:
        mtu = f" MTU {self.mtu}" if self.mtu != 1500 else ""
        return f"{self.rate_mbit} Mbit/s {self.rtt_ms} ms {self.loss_pct:g} %{mtu}"


DEFAULT_CELLS = [
    *(Cell(100, rtt, loss) for rtt in (0, 50, 100, 200) for loss in (0, 1, 2)),
    Cell(1000, 100, 1, mtu=9000),
]


def parse_cells(text: str) -> list[Cell]:
    """``rate/rtt/loss[/mtu]`` items, comma separated."""
    cells = []
    for item in text.split(","):
        parts = [float(x) for x in item.split("/")]
        mtu = int(parts[3]) if len(parts) > 3 else 1500
        cells.append(Cell(int(parts[0]), int(parts[1]), parts[2], mtu))
    return cells


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


# --- the emulator --------------------------------------------------------------------------


def wanem(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(WANEM), *args], check=check, capture_output=True, text=True
    )


def in_ns(side: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", f"wan-{side}", *cmd]


def refuse_if_busy() -> None:
    found = subprocess.run(["pgrep", "-af", "wanem"], capture_output=True, text=True).stdout
    mine = str(os.getpid())
    others = [line for line in found.splitlines() if line and not line.startswith(mine + " ")]
    if others:
        raise SystemExit(f"another wanem is running, not starting:\n{chr(10).join(others)}")


@contextmanager
def emulated(cell: Cell) -> Iterator[None]:
    delay = cell.rtt_ms / 2
    queue_ms = max(10.0, float(cell.rtt_ms))  # one BDP (at least 10 ms)
    wanem(
        "up",
        "--daemon",
        "--delay-ms",
        f"{delay:g}",
        "--loss",
        f"{cell.loss_pct / 100:g},0",
        "--rate-mbit",
        str(cell.rate_mbit),
        "--queue-ms",
        f"{queue_ms:g}",
        "--mtu",
        str(cell.mtu),
        "--cc",
        "cubic",
        "--tcp-mem-mb",
        "64",
        "--stats-interval",
        "0",
    )
    try:
        yield
    finally:
        wanem("down", check=False)


def set_cc(cc: str) -> None:
    for side in "ab":
        subprocess.run(
            in_ns(side, "sysctl", "-qw", f"net.ipv4.tcp_congestion_control={cc}"), check=True
        )


class Background:
    """A process in a namespace, stopped by its own PID."""

    def __init__(self, cmd: list[str], **kwargs: object) -> None:
        self.process = subprocess.Popen(cmd, **kwargs)  # type: ignore[call-overload]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --- the tools -----------------------------------------------------------------------------


class Servers:
    """sshd and Slipstream in b, an HTTP server in a: started once per cell."""

    def __init__(self, root: Path, payload: Path) -> None:
        self.root = root
        self.payload = payload
        self.dest = root / "dest"
        self.dest.mkdir(exist_ok=True)
        self._procs: list[Background] = []
        self._keys()
        (root / "sshd_config").write_text(SSHD_CONFIG.format(port=SSH_PORT, addr=B_ADDR, root=root))
        Path("/run/sshd").mkdir(exist_ok=True)
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self._start(in_ns("b", sshd, "-D", "-e", "-f", str(root / "sshd_config")))
        self._start(
            in_ns("a", sys.executable, "-m", "http.server", str(HTTP_PORT), "-b", A_ADDR),
            cwd=str(payload.parent),
        )
        self.slip = self._start_slipstream()
        time.sleep(0.5)

    def _keys(self) -> None:
        for name in ("ssh_host_ed25519_key", "id_ed25519"):
            if not (self.root / name).exists():
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / name)],
                    check=True,
                )
        shutil.copy(self.root / "id_ed25519.pub", self.root / "authorized_keys")

    def _start(self, cmd: list[str], **kwargs: object) -> Background:
        proc = Background(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
        self._procs.append(proc)
        return proc

    def _start_slipstream(self) -> dict[str, object]:
        qs = self.root / "qs"
        cmd = [
            sys.executable,
            "-m",
            "slipstream",
            "serve",
            "--quickstart",
            str(qs),
            "--listen",
            B_ADDR,
            "--ssh-port",
            str(SLIP_SSH),
            "--fasp-port",
            str(SLIP_UDP),
        ]
        self.server_log = open(self.root / "server.log", "a")  # noqa: SIM115 - closed in stop
        proc = Background(
            in_ns("b", *cmd), stdout=subprocess.PIPE, stderr=self.server_log, text=True
        )
        self._procs.append(proc)
        assert proc.process.stdout is not None
        return dict(json.loads(proc.process.stdout.readline()))

    def ssh_options(self) -> list[str]:
        return [
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-i",
            str(self.root / "id_ed25519"),
        ]

    def clean_dest(self) -> None:
        shutil.rmtree(self.dest, ignore_errors=True)
        self.dest.mkdir()
        for stale in (self.root / "qs" / "docroot").glob("*"):
            if stale.is_file():
                stale.unlink()

    def stop(self) -> None:
        for proc in reversed(self._procs):
            proc.stop()
        self.server_log.close()


def dest_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def timed_tcp(cmd: list[str], dest: Path, cap: float) -> float:
    """Run a TCP copy for at most ``cap`` seconds; Mbit/s of what reached ``dest``."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(cap)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    elapsed = time.monotonic() - start
    return dest_bytes(dest) * 8 / elapsed / 1e6


def run_scp(servers: Servers, cap: float) -> float:
    cmd = in_ns(
        "a",
        "scp",
        "-q",
        "-c",
        "aes128-gcm@openssh.com",
        "-P",
        str(SSH_PORT),
        *servers.ssh_options(),
        str(servers.payload),
        f"root@{B_ADDR}:{servers.dest}/",
    )
    return timed_tcp(cmd, servers.dest, cap)


def run_rsync(servers: Servers, cap: float) -> float:
    ssh = " ".join(["ssh", "-c", "aes128-gcm@openssh.com", "-p", str(SSH_PORT)])
    ssh += " " + " ".join(servers.ssh_options())
    cmd = in_ns(
        "a",
        "rsync",
        "-a",
        "--whole-file",
        "--inplace",
        "-e",
        ssh,
        str(servers.payload),
        f"root@{B_ADDR}:{servers.dest}/",
    )
    return timed_tcp(cmd, servers.dest, cap)


def run_curl(servers: Servers, cap: float) -> float:
    out = servers.dest / "curl.bin"
    url = f"http://{A_ADDR}:{HTTP_PORT}/{servers.payload.name}"
    cmd = in_ns("b", "curl", "-s", "-o", str(out), url)
    return timed_tcp(cmd, servers.dest, cap)


def slipstream_cmd(servers: Servers, extra: list[str]) -> list[str]:
    info = servers.slip
    return in_ns(
        "a",
        sys.executable,
        "-m",
        "slipstream",
        "send",
        "--host",
        B_ADDR,
        "--user",
        str(info["user"]),
        "-P",
        str(SLIP_SSH),
        "-O",
        str(SLIP_UDP),
        "--sshfp",
        str(info["sshfp"]),
        "--overwrite",
        "always",
        "-k",
        "0",
        *extra,
        str(servers.payload),
        "/",
    )


def run_slipstream(
    servers: Servers, extra: list[str], limit: float, warm: bool = False
) -> tuple[float, float]:
    """(Mbit/s over the whole command, Mbit/s of the session alone: login excluded).

    Cold (the default): no memory of earlier sessions on the path. ``warm``: the path
    memory of the previous run on this cell is used (careful resume, engine/pathmemory.py).
    """
    env = {**os.environ, "SLIPSTREAM_PASSWORD": str(servers.slip["password"])}
    env["XDG_CACHE_HOME"] = str(servers.root / "client-cache")  # per cell: never the user's
    env["SLIPSTREAM_PATH_MEMORY"] = "1" if warm else "0"
    start = time.monotonic()
    done = subprocess.run(
        slipstream_cmd(servers, ["--json-events", *extra]),
        env=env,
        capture_output=True,
        text=True,
        timeout=limit,
    )
    elapsed = time.monotonic() - start
    session = float("nan")
    for line in done.stdout.splitlines():
        with suppress(ValueError):
            event = json.loads(line)
            if event.get("type") == "session_done":
                session = float(event["rate_bps"]) / 1e6
    target = Path(str(servers.slip["docroot"])) / servers.payload.name
    if done.returncode != 0 or target.stat().st_size != servers.payload.stat().st_size:
        print(f"  slipstream failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
        server_log = (servers.root / "server.log").read_text(errors="replace")
        print("  server log tail:\n" + server_log[-3000:], file=sys.stderr)
        return float("nan"), float("nan")
    return servers.payload.stat().st_size * 8 / elapsed / 1e6, session


# --- fairness --------------------------------------------------------------------------------


def slipstream_progress(servers: Servers, extra: list[str], seconds: float) -> Background:
    env = {**os.environ, "SLIPSTREAM_PASSWORD": str(servers.slip["password"])}
    env["SLIPSTREAM_PATH_MEMORY"] = "0"  # every run starts cold
    cmd = slipstream_cmd(servers, ["--json-events", *extra])
    return Background(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def progress_rate(proc: Background, start: float, end: float) -> float:
    """Mbit/s between wall times ``start`` and ``end`` from the progress events."""
    assert proc.process.stdout is not None
    points: list[tuple[float, int]] = []
    for line in proc.process.stdout:
        with suppress(ValueError):
            event = json.loads(line)
            if event.get("type") == "progress":
                points.append((float(event["time"]), int(event["bytes"])))
    inside = [p for p in points if start <= p[0] <= end]
    if len(inside) < 2:
        return float("nan")
    (t0, b0), (t1, b1) = inside[0], inside[-1]
    return (b1 - b0) * 8 / (t1 - t0) / 1e6


def share_run(servers: Servers, extra: list[str], seconds: float) -> tuple[float, float]:
    """Slipstream next to one iperf3 CUBIC flow: (ours, TCP) Mbit/s over the same window."""
    set_cc("cubic")
    iperf_server = Background(
        in_ns("b", "iperf3", "-s", "-1", "-B", B_ADDR, "-p", str(IPERF_PORT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    ours = slipstream_progress(servers, extra, seconds)
    wall_start = time.time()
    tcp = subprocess.run(
        in_ns("a", "iperf3", "-c", B_ADDR, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J"),
        capture_output=True,
        text=True,
    )
    wall_end = time.time()
    ours.stop()
    iperf_server.stop()
    report = json.loads(tcp.stdout or "{}")
    tcp_rate = report.get("end", {}).get("sum_received", {}).get("bits_per_second", 0) / 1e6
    return progress_rate(ours, wall_start + 5, wall_end), tcp_rate


def queue_probe(servers: Servers, seconds: float) -> tuple[float, float]:
    """(idle RTT, RTT while a fair flow runs alone), ms, from ping medians."""

    def ping(count: int) -> float:
        out = subprocess.run(
            in_ns("a", "ping", "-q", "-n", "-i", "0.2", "-c", str(count), B_ADDR),
            capture_output=True,
            text=True,
        ).stdout
        for line in out.splitlines():
            if "min/avg/max" in line:
                return float(line.split("=")[1].split("/")[1])
        return float("nan")

    idle = ping(10)
    flow = slipstream_progress(servers, [], seconds)
    time.sleep(5)  # past start-up
    busy = ping(int((seconds - 8) / 0.2))
    flow.stop()
    return idle, busy


# --- main ------------------------------------------------------------------------------------


def run_cell(cell: Cell, servers: Servers, args: argparse.Namespace) -> dict[str, float]:
    row: dict[str, float] = {}
    servers.clean_dest()
    shutil.rmtree(servers.root / "client-cache", ignore_errors=True)
    whole, session = run_slipstream(servers, [], args.slip_limit)
    row["slipstream fair"], row["(session only)"] = whole, session
    if args.warm:
        servers.clean_dest()
        run_slipstream(servers, [], args.slip_limit, warm=True)  # learns the path...
        servers.clean_dest()
        whole, session = run_slipstream(servers, [], args.slip_limit, warm=True)  # ...uses it
        row["slipstream warm"], row["(warm session)"] = whole, session
    for cc in ("cubic", "bbr"):
        set_cc(cc)
        for name, tool in (("scp", run_scp), ("rsync", run_rsync), ("curl", run_curl)):
            servers.clean_dest()
            row[f"{name} {cc}"] = tool(servers, args.tcp_cap)
    servers.clean_dest()
    print(f"{cell.name}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    return row


def print_table(rows: dict[str, dict[str, float]]) -> None:
    tools = list(next(iter(rows.values())).keys())
    print("\n| path | " + " | ".join(tools) + " |")
    print("|---|" + "---|" * len(tools))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[t]:.1f}" for t in tools) + " |")


def fairness(servers: Servers, args: argparse.Namespace) -> None:
    seconds = args.share_time
    print("\nFairness, 100 Mbit/s, 50 ms, one BDP queue, one iperf3 CUBIC flow (Mbit/s):")
    print("| Slipstream | Slipstream Mbit/s | TCP Mbit/s | Slipstream share |")
    print("|---|---|---|---|")
    for label, extra in (
        ("fair", []),
        ("low", ["--policy", "low"]),
        ("fixed 50M", ["--policy", "fixed", "-l", "50M"]),
    ):
        servers.clean_dest()
        ours, theirs = share_run(servers, extra, seconds)
        share = ours / (ours + theirs) if ours + theirs > 0 else float("nan")
        print(f"| {label} | {ours:.1f} | {theirs:.1f} | {100 * share:.0f} % |", flush=True)
    servers.clean_dest()
    idle, busy = queue_probe(servers, min(seconds, 30.0))
    print(
        f"\nping RTT idle {idle:.1f} ms, with a fair flow alone {busy:.1f} ms ({busy / idle:.2f}x)"
    )


def make_payload(path: Path, size: int) -> Path:
    with open(path, "wb") as handle:
        for _ in range(0, size, 1 << 24):
            handle.write(os.urandom(min(1 << 24, size - handle.tell())))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="payload size (default 1G)")
    parser.add_argument("--cells", help="rate/rtt/loss[/mtu],... (default: the full matrix)")
    parser.add_argument("--tcp-cap", type=float, default=60.0, help="seconds per TCP run")
    parser.add_argument("--slip-limit", type=float, default=600.0, help="seconds, Slipstream")
    parser.add_argument("--share-time", type=float, default=60.0, help="fairness run seconds")
    parser.add_argument(
        "--warm",
        action="store_true",
        help="also run Slipstream with the memory of a previous session on the path",
    )
    parser.add_argument("--no-fairness", action="store_true")
    parser.add_argument("--only-fairness", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("wanem needs root")
    # SIGTERM (and SIGINT, which a background shell job ignores) must still run the
    # clean-up below: stop our servers and take our wanem instance down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    refuse_if_busy()
    cells = parse_cells(args.cells) if args.cells else DEFAULT_CELLS
    root = Path(tempfile.mkdtemp(prefix="slipstream-wan-"))
    size = parse_size(args.size)
    payload = make_payload(root / "payload.bin", size)
    rows: dict[str, dict[str, float]] = {}
    try:
        if not args.only_fairness:
            for cell in cells:
                with emulated(cell):
                    servers = Servers(root, payload)
                    try:
                        rows[cell.name] = run_cell(cell, servers, args)
                    finally:
                        servers.stop()
            print(f"\n{size / 2**20:.0f} MiB, Mbit/s; TCP runs capped at {args.tcp_cap:g} s")
            print_table(rows)
        if not args.no_fairness:
            # Enough data to outlast the window even alone on the link (100 Mbit/s).
            share_payload = make_payload(root / "share.bin", int(args.share_time * 14e6))
            with emulated(Cell(100, 50, 0)):
                servers = Servers(root, share_payload)
                try:
                    fairness(servers, args)
                finally:
                    servers.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
