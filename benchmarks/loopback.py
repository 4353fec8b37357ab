"""Loopback throughput: one file, Slipstream (encrypted) next to scp and rsync over ssh.

    python3 benchmarks/loopback.py --size 1G --runs 3

Everything runs on 127.0.0.1 in the same run, so the ratios mean something on a noisy
machine. A throwaway sshd (its own config, host key and user key in a temporary folder) serves
scp and rsync; it and the Slipstream server are stopped by PID at the end. Rates count file
bytes over wall time including connection set-up, as a user would time them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
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


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timed(action: Callable[[], None]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


class Sshd:
    """A private sshd on loopback for the TCP baselines."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-f",
                str(root / "ssh_host_ed25519_key"),
            ],
            check=True,
        )
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "id_ed25519")],
            check=True,
        )
        shutil.copy(root / "id_ed25519.pub", root / "authorized_keys")
        (root / "sshd_config").write_text(SSHD_CONFIG.format(port=self.port, root=root))
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        Path("/run/sshd").mkdir(exist_ok=True)
        self.process = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(root / "sshd_config")], stderr=subprocess.DEVNULL
        )
        time.sleep(0.5)

    def ssh_options(self, cipher: str | None) -> list[str]:
        options = [
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-i",
            str(self.root / "id_ed25519"),
        ]
        return options + (["-c", cipher] if cipher else [])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def run_scp(sshd: Sshd, src: Path, dest: Path, cipher: str | None) -> None:
    subprocess.run(
        [
            "scp",
            "-q",
            "-P",
            str(sshd.port),
            *sshd.ssh_options(cipher),
            str(src),
            f"root@127.0.0.1:{dest}",
        ],
        check=True,
    )


def run_rsync(sshd: Sshd, src: Path, dest: Path) -> None:
    ssh = " ".join(["ssh", "-p", str(sshd.port), *sshd.ssh_options(None)])
    subprocess.run(
        ["rsync", "-a", "--whole-file", "-e", ssh, str(src), f"root@127.0.0.1:{dest}"], check=True
    )


def start_slipstream(root: Path) -> tuple[subprocess.Popen[str], dict[str, object]]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slipstream",
            "serve",
            "--quickstart",
            str(root / "qs"),
            "--ssh-port",
            "0",
            "--fasp-port",
            "0",
            "--api-port",
            "0",
            "--fallback-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    return process, json.loads(process.stdout.readline())


def run_slipstream(info: dict[str, object], src: Path, extra: list[str]) -> None:
    env = {**os.environ, "SLIPSTREAM_PASSWORD": str(info["password"])}
    env["SLIPSTREAM_PATH_MEMORY"] = "0"  # every run starts cold, whatever ran before
    subprocess.run(
        [
            sys.executable,
            "-m",
            "slipstream",
            "send",
            "--host",
            str(info["host"]),
            "--user",
            str(info["user"]),
            "-P",
            str(info["ssh_port"]),
            "-O",
            str(info["fasp_port"]),
            "--sshfp",
            str(info["sshfp"]),
            "--overwrite",
            "always",
            *extra,
            str(src),
            "/",
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only-slipstream", action="store_true")
    args = parser.parse_args()
    size = parse_size(args.size)
    root = Path(tempfile.mkdtemp(prefix="slipstream-bench-"))
    src = root / "payload.bin"
    with open(src, "wb") as handle:
        for _ in range(0, size, 1 << 24):
            handle.write(os.urandom(min(1 << 24, size - handle.tell())))
    server, info = start_slipstream(root)
    sshd = None if args.only_slipstream else Sshd(root)
    dest_dir = root / "tcp-dest"
    dest_dir.mkdir()
    cases: dict[str, Callable[[], None]] = {
        "slipstream aes-128": lambda: run_slipstream(info, src, []),
        "slipstream none (auth only)": lambda: run_slipstream(info, src, ["-T"]),
        "slipstream aes-128 -Z 9000": lambda: run_slipstream(info, src, ["-Z", "9000"]),
    }
    if sshd is not None:
        cases |= {
            "scp (default cipher)": lambda: run_scp(sshd, src, dest_dir / "a", None),
            "scp aes128-gcm": lambda: run_scp(sshd, src, dest_dir / "b", "aes128-gcm@openssh.com"),
            "rsync -e ssh": lambda: run_rsync(sshd, src, dest_dir / "c"),
        }
    results: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for _ in range(args.runs):
            for name, action in cases.items():
                # Every run starts from an empty destination: rsync would otherwise skip the
                # unchanged file and "win" without copying anything.
                shutil.rmtree(dest_dir, ignore_errors=True)
                dest_dir.mkdir()
                for stale in (root / "qs" / "docroot").glob("payload.bin*"):
                    stale.unlink()
                results[name].append(size * 8 / timed(action) / 1e9)
    finally:
        server.terminate()
        server.wait(timeout=10)
        if sshd is not None:
            sshd.stop()
        shutil.rmtree(root, ignore_errors=True)
    print_table(results, size)


def print_table(results: dict[str, list[float]], size: int) -> None:
    cc = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    reference = statistics.median(results.get("scp aes128-gcm") or [float("nan")])
    print(f"\n{size / 2**30:.2f} GiB over 127.0.0.1, TCP congestion control: {cc}")
    print(f"{'tool':32} {'median Gbit/s':>14} {'runs':>24} {'x scp-gcm':>10}")
    for name, runs in results.items():
        median = statistics.median(runs)
        shown = " ".join(f"{r:.2f}" for r in runs)
        print(f"{name:32} {median:14.2f} {shown:>24} {median / reference:10.2f}")


if __name__ == "__main__":
    main()
