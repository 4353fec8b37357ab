"""Many small files, and resume after kill -9: Slipstream next to rsync, tar over ssh, scp -r.

    python3 benchmarks/smallfiles.py loopback --runs 3
    python3 benchmarks/smallfiles.py wan --loss 0 --runs 3        # root; uses wanem
    python3 benchmarks/smallfiles.py wan --loss 0.01 --runs 3 --cap 120
    python3 benchmarks/smallfiles.py resume --size 2G

``--warm`` adds the repeated-transfer case: Slipstream with ``--persist`` (one SSH login kept
by a background master, transport/shared.py) and its path memory on, next to rsync over an
OpenSSH ControlMaster connection; each gets one untimed run first, as a second transfer to a
server would. ``--only REGEX`` runs the matching tools only.

``loopback`` and ``wan`` send 10,000 files of 10 KiB (100 folders, random data, on tmpfs at both
ends, as research/smallfiles-anchors.md did) with every tool in the same run, each to an
empty destination, and print wall times. ``wan`` puts the servers in wanem's namespace b and
the clients in namespace a, over 100 Mbit/s with 50 ms each way (RTT 100 ms); its "x" column
divides by the link time of the payload (102.4 MB at 100 Mbit/s = 8.19 s). wanem runs one
instance per machine: this script waits until no other is up, and takes it down at the end.
A tool that runs past ``--cap`` seconds is stopped and its rate extrapolated from what it
copied, as the anchors did.

``resume`` sends one big file over loopback, kills the sender (then, in a second round, the
receiving server) with SIGKILL at about half way, runs the same command again, and reports
how many of the bytes already written were sent again.

Every process this script starts is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

WANEM = Path(__file__).resolve().parents[1].parent / "shared" / "tools" / "wanem" / "wanem"
WAN_SERVER, WAN_RATE_MBIT, WAN_DELAY_MS = "10.77.0.2", 100, 50
FILES, FOLDERS, FILE_SIZE = 10_000, 100, 10 * 1024
SSHD_PORT = 22022
PAYLOAD = FILES * FILE_SIZE

SSHD_CONFIG = """\
Port {port}
ListenAddress {listen}
HostKey {root}/host_key
AuthorizedKeysFile {root}/authorized_keys
PidFile none
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
SetEnv SHLVL=1
"""
# SetEnv SHLVL=1 keeps bash from sourcing root's ~/.bashrc (pyenv init, +160 ms a session
# on this VM), as the anchors did: the baselines are measured without that local cost.


def ssh_config(root: Path, host: str, port: int) -> Path:
    path = root / "ssh_config"
    path.write_text(
        f"Host bench\n  HostName {host}\n  Port {port}\n  User root\n"
        f"  IdentityFile {root}/id_ed25519\n  UserKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking no\n  LogLevel ERROR\n  BatchMode yes\n"
        "  ControlMaster no\n  Compression no\n"
    )
    return path


def ssh_master_options(root: Path) -> str:
    """OpenSSH's connection sharing for the warm rows: the TCP tools' --persist."""
    return f"-o ControlMaster=auto -o ControlPath={root}/cm-%C -o ControlPersist=600"


@dataclass
class Net:
    """Where servers and clients run: the root namespace, or wanem's two sides."""

    wan: bool

    def client(self, command: list[str]) -> list[str]:
        return [str(WANEM), "exec", "a", *command] if self.wan else command

    def server(self, command: list[str]) -> list[str]:
        return [str(WANEM), "exec", "b", *command] if self.wan else command

    @property
    def host(self) -> str:
        return WAN_SERVER if self.wan else "127.0.0.1"


@dataclass
class Servers:
    root: Path
    net: Net
    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    info: dict[str, object] = field(default_factory=dict)
    ssh: Path = Path()

    def start(self) -> None:
        self._start_sshd()
        self.start_slipstream()

    def _start_sshd(self) -> None:
        for name in ("host_key", "id_ed25519"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / name)],
                check=True,
            )
        shutil.copy(self.root / "id_ed25519.pub", self.root / "authorized_keys")
        port = SSHD_PORT
        text = SSHD_CONFIG.format(port=port, listen=self.net.host, root=self.root)
        (self.root / "sshd_config").write_text(text)
        Path("/run/sshd").mkdir(exist_ok=True)
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        command = self.net.server([sshd, "-D", "-e", "-f", str(self.root / "sshd_config")])
        self.processes.append(subprocess.Popen(command, stderr=subprocess.DEVNULL, text=True))
        self.ssh = ssh_config(self.root, self.net.host, port)
        time.sleep(0.5)

    def start_slipstream(self) -> None:
        command = [sys.executable, "-m", "slipstream", "serve", "--quickstart"]
        command += [str(self.root / "qs"), "--listen", self.net.host]
        command += ["--ssh-port", "0", "--fasp-port", "0", "--api-port", "0"]
        command += ["--fallback-port", "0"]
        log = open(self.root / "server.log", "w")  # noqa: SIM115 (lives as long as the server)
        process = subprocess.Popen(
            self.net.server(command), stdout=subprocess.PIPE, stderr=log, text=True
        )
        self.processes.append(process)
        assert process.stdout is not None
        self.info = json.loads(process.stdout.readline())

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def make_files(src: Path) -> None:
    for folder in range(FOLDERS):
        path = src / f"d{folder:03d}"
        path.mkdir(parents=True, exist_ok=True)
        for index in range(FILES // FOLDERS):
            (path / f"f{index:03d}.bin").write_bytes(os.urandom(FILE_SIZE))


def copied_bytes(dest: Path) -> int:
    return sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) if dest.exists() else 0


@dataclass
class Outcome:
    seconds: float
    copied: int
    capped: bool


def timed(command: list[str], cap: float, dest: Path, env: dict[str, str] | None = None) -> Outcome:
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = process.communicate(timeout=cap)
        capped = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the tool and its own children (ssh, tar)
        process.communicate()
        err, capped = "", True
    seconds = time.perf_counter() - start
    if process.returncode not in (0, -9) and not capped:
        raise RuntimeError(f"{command[:4]} failed: {err[-500:]}")
    return Outcome(seconds, copied_bytes(dest), capped)


Command = tuple[list[str], dict[str, str]]  # argv and extra environment


def slipstream_send(servers: Servers, source: Path, remote_dest: str, extra: list[str]) -> Command:
    info = servers.info
    command = [sys.executable, "-m", "slipstream", "send", "--host", str(info["host"])]
    command += ["--user", str(info["user"]), "-P", str(info["ssh_port"])]
    command += ["-O", str(info["fasp_port"]), "--sshfp", str(info["sshfp"])]
    env = {
        "SLIPSTREAM_PASSWORD": str(info["password"]),
        "SLIPSTREAM_PATH_MEMORY": "0",  # every run starts cold, whatever ran before
        "SLIPSTREAM_KNOWN_HOSTS": str(servers.root / "known_hosts"),
        "XDG_CACHE_HOME": str(servers.root / "cache"),  # never the user's path memory
        "XDG_RUNTIME_DIR": str(servers.root / "run"),  # where --persist keeps its master
    }
    return servers.net.client([*command, *extra, str(source), remote_dest]), env


def slipstream_warm(servers: Servers, source: Path, remote_dest: str, extra: list[str]) -> Command:
    """A repeated transfer: a kept SSH login (--persist) and the path remembered."""
    command, env = slipstream_send(servers, source, remote_dest, ["--persist", "600", *extra])
    env.pop("SLIPSTREAM_PATH_MEMORY")
    return command, env


def stop_masters(servers: Servers) -> None:
    """Ends what the warm rows left running: Slipstream's masters, OpenSSH's."""
    from slipstream.transport.shared import stop_master

    for path in (servers.root / "run").glob("slipstream-*/ssh-*.sock"):
        asyncio.run(stop_master(path))
    for path in servers.root.glob("cm-*"):
        subprocess.run(
            ["ssh", "-F", str(servers.ssh), "-o", f"ControlPath={path}", "-O", "exit", "bench"],
            capture_output=True,
            check=False,
        )


def tool_commands(servers: Servers, src: Path, dest: Path, warm: bool) -> dict[str, Command]:
    """Every tool, copying the tree ``src`` to ``dest`` on the server."""
    net, cfg = servers.net, str(servers.ssh)
    remote_dest = "/" + str(dest.relative_to(Path(str(servers.info["docroot"]))))
    tar = f"tar -C {src} -cf - . | ssh -F {cfg} bench 'mkdir -p {dest} && tar -C {dest} -xf -'"
    scp = ["scp", "-F", cfg, "-c", "aes128-gcm@openssh.com", "-r", str(src), f"bench:{dest}"]
    commands = {"slipstream (fair)": slipstream_send(servers, src, remote_dest, ["-d"])}
    if net.wan:  # the link rate known, as Aspera users set it: fixed, just below the link
        fixed = ["-d", "--policy", "fixed", "-l", f"{WAN_RATE_MBIT - 4}M"]
        commands["slipstream (fixed)"] = slipstream_send(servers, src, remote_dest, fixed)
    if warm:
        commands["slipstream (fair, warm)"] = slipstream_warm(servers, src, remote_dest, ["-d"])
    rsync = ["rsync", "-a", "-e", f"ssh -F {cfg}", f"{src}/", f"bench:{dest}/"]
    commands["rsync -a"] = (net.client(rsync), {})
    if warm:
        shared = f"ssh -F {cfg} {ssh_master_options(servers.root)}"
        rsync_warm = ["rsync", "-a", "-e", shared, f"{src}/", f"bench:{dest}/"]
        commands["rsync -a (warm)"] = (net.client(rsync_warm), {})
    commands["tar over ssh"] = (net.client(["bash", "-c", tar]), {})
    commands["scp -r"] = (net.client(scp), {})
    return commands


def wait_for_closed_connections(net: Net, port: int = SSHD_PORT, limit: float = 180) -> None:
    """After a TCP tool is stopped, the kernel still sends what its socket had buffered
    (several MB at 1 % loss, for tens of seconds): the next run must not share the link
    with it. Waits until no connection to the sshd has anything left to send (an idle
    ControlMaster connection may stay)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        listing = subprocess.run(
            net.client(["ss", "-Htn", "state", "all", "dport", f"= :{port}"]),
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        if all(int(line.split()[2]) == 0 for line in listing.splitlines()):
            return
        time.sleep(1)
    print(f"  (a connection to port {port} was still open after {limit:g} s)", flush=True)


def fresh_folder(dest: Path) -> None:
    """An empty ``dest``. After a run stopped at the cap, the server's side of a TCP tool
    (tar, scp's sftp-server) may still be writing for a while: wait until it has stopped, or
    its late files would count for the next tool."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        before = copied_bytes(dest)
        time.sleep(0.5)
        if copied_bytes(dest) == before:
            shutil.rmtree(dest, ignore_errors=True)
            if not dest.exists():
                dest.mkdir(parents=True)
                return
    raise RuntimeError(f"{dest} is still being written to a minute after its run ended")


def run_matrix(servers: Servers, src: Path, args: argparse.Namespace) -> dict[str, list[Outcome]]:
    docroot = Path(str(servers.info["docroot"]))
    results: dict[str, list[Outcome]] = {}
    # attempt -1: the warm rows' untimed first run (their login kept, their path learnt)
    for attempt in range(-1 if args.warm else 0, args.runs):
        dest = docroot / f"run{attempt}"
        for name, (command, env) in tool_commands(servers, src, dest, args.warm).items():
            if not re.search(args.only, name) or (attempt < 0 and "warm" not in name):
                continue
            fresh_folder(dest)
            outcome = timed(command, args.cap, dest, env)
            if outcome.capped:
                wait_for_closed_connections(servers.net)
            if attempt < 0:
                print(f"  {name:20} {outcome.seconds:7.2f} s  (untimed first run)", flush=True)
                continue
            results.setdefault(name, []).append(outcome)
            print(
                f"  {name:20} {outcome.seconds:7.2f} s  {outcome.copied / 1e6:7.1f} MB"
                + ("  (capped)" if outcome.capped else ""),
                flush=True,
            )
        shutil.rmtree(dest, ignore_errors=True)
    return results


def extrapolated(outcome: Outcome) -> float:
    """Seconds for the whole payload; a capped run scaled by what it copied."""
    if not outcome.capped:
        return outcome.seconds
    return outcome.seconds * PAYLOAD / max(outcome.copied, 1)


def print_table(results: dict[str, list[Outcome]], link_seconds: float | None) -> None:
    header = "| tool | median s | runs (s) |" + (" x link time |" if link_seconds else "")
    print("\n" + header)
    print("|---|---|---|" + ("---|" if link_seconds else ""))
    for name, outcomes in results.items():
        times = [extrapolated(o) for o in outcomes]
        median = statistics.median(times)
        shown = ", ".join(
            f"{t:.2f}" + ("*" if o.capped else "") for t, o in zip(times, outcomes, strict=True)
        )
        ratio = f" {median / link_seconds:.2f} |" if link_seconds else ""
        print(f"| {name} | {median:.2f} | {shown} |{ratio}")
    if any(o.capped for outcomes in results.values() for o in outcomes):
        print("\n(*) stopped at the cap; time extrapolated from the bytes copied")


# --- wanem ---------------------------------------------------------------------------------------


def wanem_running() -> bool:
    return subprocess.run(["pgrep", "-f", "wanem"], capture_output=True).returncode == 0


def wanem_up(loss: float, cc: str) -> None:
    if wanem_running():
        print("waiting: another wanem instance is running", flush=True)
    while wanem_running():  # one instance per machine: wait for the other user
        time.sleep(2)
    subprocess.run(
        [
            str(WANEM),
            "up",
            "--daemon",
            "--rate-mbit",
            str(WAN_RATE_MBIT),
            "--delay-ms",
            str(WAN_DELAY_MS),
            "--loss",
            str(loss),
            "--cc",
            cc,
            "--seed",
            "1",
            "--stats-interval",
            "0",
        ],
        check=True,
    )


def wanem_down() -> None:
    subprocess.run([str(WANEM), "down"], check=False)


# --- resume after kill -9 ---------------------------------------------------------------------


def allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def resume_round(servers: Servers, src: Path, victim: str, size: int) -> dict[str, float]:
    """Send ``src``, SIGKILL the ``victim`` at half way, send again; what was sent twice."""
    docroot = Path(str(servers.info["docroot"]))
    partial = docroot / (src.name + ".partial")
    (docroot / src.name).unlink(missing_ok=True)
    command, env = slipstream_send(servers, src, "/", [])
    first = subprocess.Popen(
        command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    start = time.perf_counter()
    while allocated(partial) < size // 2:
        time.sleep(0.005)
    killed_after = time.perf_counter() - start
    if victim == "sender":
        first.send_signal(signal.SIGKILL)
        first.wait()
        time.sleep(1.0)  # the receiving server notices, and records what it holds
    else:
        server = servers.processes.pop()
        server.send_signal(signal.SIGKILL)
        server.wait()
        first.wait()
        servers.start_slipstream()  # the same folder: same docroot, keys and password
    written = allocated(partial)
    command, env = slipstream_send(servers, src, "/", ["--json-events"])
    start = time.perf_counter()
    second = subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    resumed_seconds = time.perf_counter() - start
    events = [json.loads(line) for line in second.stdout.splitlines()]
    offset = int(next(e for e in events if e["type"] == "file_done").get("resumed_from", 0))
    if subprocess.run(["cmp", str(src), str(docroot / src.name)]).returncode != 0:
        raise RuntimeError("the resumed file differs from the source")
    return {
        "killed_after_s": killed_after,
        "written_at_kill": written,
        "resumed_from": offset,
        "sent_again": written - offset,
        "sent_again_pct_of_written": 100 * (written - offset) / written,
        "resumed_run_s": resumed_seconds,
    }


def run_resume(root: Path, size: int) -> None:
    servers = Servers(root, Net(wan=False))
    servers.start_slipstream()
    src = root / "big.bin"
    with open(src, "wb") as handle:
        for _ in range(0, size, 1 << 24):
            handle.write(os.urandom(min(1 << 24, size - handle.tell())))
    try:
        for victim in ("sender", "receiver"):
            result = resume_round(servers, src, victim, size)
            print(f"\nkill -9 of the {victim} at ~50 % of {size / 2**30:.2f} GiB:")
            for key, value in result.items():
                print(
                    f"  {key:28} {value:,.3f}"
                    if isinstance(value, float)
                    else f"  {key:28} {value:,}"
                )
    finally:
        servers.stop()


# --- main ----------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return (
        int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["loopback", "wan", "resume"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--loss", type=float, default=0.0, help="wan: loss fraction, both ways")
    parser.add_argument("--cc", default="cubic", help="wan: TCP congestion control")
    parser.add_argument("--cap", type=float, default=120.0, help="seconds before a run stops")
    parser.add_argument("--size", default="2G", help="resume: file size")
    parser.add_argument("--warm", action="store_true", help="add the repeated-transfer rows")
    parser.add_argument("--only", default="", help="run the tools whose name matches")
    args = parser.parse_args()
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    root = Path(tempfile.mkdtemp(prefix="slipstream-smallfiles-", dir=base))
    try:
        if args.mode == "resume":
            run_resume(root, parse_size(args.size))
            return
        _run_small_files(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_small_files(root: Path, args: argparse.Namespace) -> None:
    src = root / "src"
    make_files(src)
    net = Net(wan=args.mode == "wan")
    if net.wan:
        wanem_up(args.loss, args.cc)
    servers = Servers(root, net)
    try:
        servers.start()
        what = "loopback"
        if net.wan:
            what = f"WAN {WAN_RATE_MBIT} Mbit/s, RTT {2 * WAN_DELAY_MS} ms, loss {args.loss:.0%}"
        print(f"{FILES} x {FILE_SIZE // 1024} KiB over {what}", flush=True)
        results = run_matrix(servers, src, args)
    finally:
        stop_masters(servers)
        servers.stop()
        if net.wan:
            wanem_down()
    link = PAYLOAD * 8 / (WAN_RATE_MBIT * 1e6) if net.wan else None
    print_table(results, link)


if __name__ == "__main__":
    main()
