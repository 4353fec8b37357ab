"""Loopback UDP throughput of slipstream.transport.udp.DatagramSocket, in two processes.

    python3 benchmarks/udp_io.py --seconds 3

``--seconds`` is the total budget, split evenly over the cases (so the run stays bounded on a
shared machine). Each case forks a receiver (pinned to the second CPU) and a sender (first
CPU) that sends 1472-byte datagrams unpaced to 127.0.0.1; the receiver counts what arrives.
Cases: sender {per-datagram sendto, GSO} x receiver {plain recvfrom_into, GRO} x
{cleartext, AES-128-GCM per datagram}. On loopback the kernel's receive path runs in the
sender's softirq, so "tx cpu" includes most of the kernel cost.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import select
import struct
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path

try:
    from slipstream.transport.udp import DatagramSocket, Received
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from slipstream.transport.udp import DatagramSocket, Received

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PAYLOAD = 1472  # fills a 1500-byte Ethernet MTU with IPv4 + UDP headers
HEADER = struct.Struct("!Q")  # packet number: the AEAD nonce suffix and associated data
TAG = 16
BATCH = 44  # 44 x 1472 = 64768 B, the most that fits one GSO super-datagram
KEY = bytes(range(16))
SALT = b"slip"  # 4-byte nonce prefix; nonce = salt || packet number


@dataclass(frozen=True)
class Case:
    gso: bool
    gro: bool
    aes: bool

    @property
    def name(self) -> str:
        send = "GSO" if self.gso else "sendto"
        recv = "GRO" if self.gro else "plain"
        return f"{send:6} -> {recv:5} {'AES-GCM' if self.aes else 'clear'}"


def pin(cpu: int) -> None:
    # Sender and receiver on different cores, as in research/performance.md §4.
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


# -- sender ---------------------------------------------------------------------------------


def sender(case: Case, addr: tuple[str, int], seconds: float, result: Connection) -> None:
    pin(0)
    sock = DatagramSocket.bind("127.0.0.1", 0, gso=case.gso, gro=False)
    buf = bytearray(BATCH * PAYLOAD)
    view = memoryview(buf)
    datagrams = [view[i * PAYLOAD : (i + 1) * PAYLOAD] for i in range(BATCH)]
    aead = AESGCM(KEY)  # built once: per-packet construction costs 5x
    plaintext = bytes(PAYLOAD - HEADER.size - TAG)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    packet_number = sent = 0
    cpu0, start = cpu_seconds(), time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        if case.aes:
            packet_number = encrypt_batch(aead, datagrams, plaintext, packet_number)
        sent += send_all(sock, datagrams, addr, poller)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    result.send((sent, elapsed, cpu, sock.gso_supported))
    sock.close()


def encrypt_batch(
    aead: AESGCM, datagrams: list[memoryview], plaintext: bytes, packet_number: int
) -> int:
    for datagram in datagrams:
        HEADER.pack_into(datagram, 0, packet_number)
        header = datagram[: HEADER.size]
        aead.encrypt_into(SALT + header, plaintext, header, datagram[HEADER.size :])
        packet_number += 1
    return packet_number


def send_all(
    sock: DatagramSocket, datagrams: list[memoryview], addr: tuple[str, int], poller: select.poll
) -> int:
    done = sock.send_batch(datagrams, addr)
    while done < len(datagrams):
        # Kernel full: wait for room (ENOBUFS keeps POLLOUT set, so the timeout bounds it).
        poller.poll(1)
        done += sock.send_batch(datagrams[done:], addr)
    return done


# -- receiver -------------------------------------------------------------------------------


def receiver(case: Case, ready: Connection, stop: Event, result: Connection) -> None:
    pin(1)
    sock = DatagramSocket.bind("127.0.0.1", 0, gso=False, gro=case.gro)
    ready.send((sock.local_address, sock.gro_enabled))
    aead = AESGCM(KEY)
    plain = bytearray(PAYLOAD - HEADER.size - TAG)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    count = nbytes = failures = 0
    first = last = 0.0
    cpu0 = cpu_seconds()
    while True:
        batch = sock.recv_batch(256)
        if not batch:
            if stop.is_set():
                break
            poller.poll(20)
            continue
        last = time.perf_counter()
        first = first or last
        count += len(batch)
        if case.aes:
            failures += decrypt_batch(aead, batch, plain)
        for data, _addr in batch:
            nbytes += len(data)
    result.send((count, nbytes, last - first, cpu_seconds() - cpu0, failures))
    sock.close()


def decrypt_batch(aead: AESGCM, batch: Received, plain: bytearray) -> int:
    failures = 0
    for data, _addr in batch:
        header = data[: HEADER.size]
        try:
            aead.decrypt_into(SALT + header, data[HEADER.size :], header, plain)
        except Exception:  # InvalidTag: counted, the benchmark keeps going
            failures += 1
    return failures


# -- driver ---------------------------------------------------------------------------------


def run_case(case: Case, seconds: float) -> dict[str, float]:
    ctx = mp.get_context("fork")
    ready_rx, ready_tx = ctx.Pipe(duplex=False)
    rx_result_r, rx_result_w = ctx.Pipe(duplex=False)
    tx_result_r, tx_result_w = ctx.Pipe(duplex=False)
    stop = ctx.Event()
    recv_proc = ctx.Process(target=receiver, args=(case, ready_tx, stop, rx_result_w))
    recv_proc.start()
    addr, gro = ready_rx.recv()
    send_proc = ctx.Process(target=sender, args=(case, addr, seconds, tx_result_w))
    send_proc.start()
    sent, tx_elapsed, tx_cpu, gso = tx_result_r.recv()
    send_proc.join(5)
    time.sleep(0.05)  # let the receiver drain its socket buffer
    stop.set()
    count, nbytes, rx_elapsed, rx_cpu, failures = rx_result_r.recv()
    recv_proc.join(5)
    for proc in (send_proc, recv_proc):
        if proc.is_alive():
            proc.kill()  # our own children only
    rx_elapsed = rx_elapsed or tx_elapsed
    return {
        "sent_pps": sent / tx_elapsed,
        "recv_pps": count / rx_elapsed,
        "gbps": nbytes * 8 / rx_elapsed / 1e9,
        "loss": 1 - count / sent if sent else 0.0,
        "tx_us": tx_cpu / sent * 1e6 if sent else 0.0,
        "rx_us": rx_cpu / count * 1e6 if count else 0.0,
        "gso": gso,
        "gro": gro,
        "bad": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="total budget (all cases)")
    parser.add_argument("--only", default="", help="run cases whose name contains this")
    args = parser.parse_args()
    cases = [
        Case(gso, gro, aes)
        for aes, gso, gro in itertools.product((False, True), repeat=3)
        if args.only.lower() in Case(gso, gro, aes).name.lower()
    ]
    per_case = max(0.25, args.seconds / max(1, len(cases)))
    print(f"payload {PAYLOAD} B, {per_case:.2f} s per case, {BATCH} datagrams per send_batch")
    header = (
        f"{'case':24} {'sent kdg/s':>10} {'recv kdg/s':>10} {'Gbit/s':>7} {'loss':>6} "
        f"{'tx us/dg':>8} {'rx us/dg':>8}"
    )
    print(header)
    print("-" * len(header))
    for case in cases:
        r = run_case(case, per_case)
        note = (
            "" if (r["gso"] or not case.gso) and (r["gro"] or not case.gro) else "  (offload off)"
        )
        note += f"  ({r['bad']:.0f} bad tags)" if r["bad"] else ""
        print(
            f"{case.name:24} {r['sent_pps'] / 1e3:10.0f} {r['recv_pps'] / 1e3:10.0f} "
            f"{r['gbps']:7.2f} {r['loss']:6.1%} {r['tx_us']:8.2f} {r['rx_us']:8.2f}{note}"
        )


if __name__ == "__main__":
    main()
