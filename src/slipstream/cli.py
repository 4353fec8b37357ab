"""The `slipstream` command: send | recv | serve | spec | demo.

Exit codes: 0 success; 1 the transfer failed or some files failed; 2 bad usage or an invalid
spec (nothing was transferred).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import click

from slipstream import __version__
from slipstream.errors import SlipstreamError, SpecError, UsageError

EXIT_FAILED = 1
EXIT_USAGE = 2


def fail(error: SlipstreamError) -> NoReturn:
    if isinstance(error, SpecError) and len(error.problems) > 1:
        click.echo(f"error: {len(error.problems)} problems (code {error.code}):", err=True)
        for loc, why in error.problems:
            click.echo(f"  {loc}: {why}" if loc else f"  {why}", err=True)
    else:
        click.echo(f"error: {error.user_message} (code {error.code})", err=True)
    sys.exit(EXIT_USAGE if isinstance(error, SpecError | UsageError) else EXIT_FAILED)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="slipstream")
def main() -> None:
    """Slipstream: fast, encrypted file transfer over UDP."""


# --- spec ------------------------------------------------------------------------------


@main.group()
def spec() -> None:
    """Work with TransferSpec JSON documents."""


@spec.command("validate")
@click.argument("file", required=False)
@click.option(
    "--example",
    type=click.Choice(["download", "upload"]),
    help="Validate a bundled example instead of FILE.",
)
def spec_validate(file: str | None, example: str | None) -> None:
    """Print the normalised spec of FILE (or - for stdin) as JSON, or every problem."""
    from slipstream.spec import parse_transfer_spec_json

    if (file is None) == (example is None):
        fail(UsageError("give a FILE (or -) or --example, not both"))
    text = _read_spec_text(file) if file is not None else _example_text(example or "")
    try:
        parsed = parse_transfer_spec_json(text)
    except SpecError as exc:
        fail(exc)
    click.echo(json.dumps(parsed.to_json_dict(), indent=2, ensure_ascii=False))


def _read_spec_text(file: str) -> str:
    if file == "-":
        return sys.stdin.read()
    try:
        return Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(UsageError(f"cannot read {file}: {exc}"))


def _example_text(name: str) -> str:
    return resources.files("slipstream").joinpath(f"examples/{name}.json").read_text("utf-8")


# --- serve -----------------------------------------------------------------------------


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Server TOML.")
@click.option(
    "--quickstart",
    "quickstart_dir",
    type=click.Path(file_okay=False),
    help="Create (or reuse) a ready-to-use config, user, docroot and keys under DIR.",
)
@click.option("--listen", help="Address to listen on (quickstart default: 127.0.0.1).")
@click.option("--ssh-port", type=int, help="Override the SSH control port (0: any free port).")
@click.option("--fasp-port", type=int, help="Override the UDP data port (0: any free port).")
def serve(
    config_path: str | None,
    quickstart_dir: str | None,
    listen: str | None,
    ssh_port: int | None,
    fasp_port: int | None,
) -> None:
    """Run the transfer server. With --quickstart, print one JSON line once it is ready."""
    from slipstream.server.app import serve_forever

    if (config_path is None) == (quickstart_dir is None):
        fail(UsageError("give either --config FILE or --quickstart DIR"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config, extra = _server_config(config_path, quickstart_dir, listen)
        config = _override_ports(config, ssh_port, fasp_port)

        def ready(info: dict[str, Any]) -> None:
            click.echo(json.dumps({**info, **extra}), nl=True)
            sys.stdout.flush()

        asyncio.run(serve_forever(config, ready))
    except SlipstreamError as exc:
        fail(exc)
    except KeyboardInterrupt:
        pass


def _server_config(
    config_path: str | None, quickstart_dir: str | None, listen: str | None
) -> tuple[Any, dict[str, Any]]:
    import dataclasses

    from slipstream.server.config import load_server_config
    from slipstream.server.quickstart import create_quickstart

    if quickstart_dir is not None:
        info = create_quickstart(
            Path(quickstart_dir), listen=listen or "127.0.0.1", ssh_port=33001, fasp_port=33001
        )
        config = load_server_config(info.config_path)
        extra = {"user": info.user, "password": info.password, "docroot": str(info.docroot)}
        return config, extra
    config = load_server_config(config_path or "")
    if listen:
        config = dataclasses.replace(config, listen=listen)
    return config, {}


def _override_ports(config: Any, ssh_port: int | None, fasp_port: int | None) -> Any:
    import dataclasses

    changes = {k: v for k, v in (("ssh_port", ssh_port), ("fasp_port", fasp_port)) if v is not None}
    return dataclasses.replace(config, **changes) if changes else config


# --- send / recv -----------------------------------------------------------------------

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:bps|b|bit/s)?\s*$", re.IGNORECASE)
_RATE_SCALE = {"": 1, "k": 1, "m": 1_000, "g": 1_000_000}


def parse_rate_kbps(text: str) -> int:
    """ascp-style rates: a plain number is kbit/s; k, M, G suffixes (``100M``, ``1g``)."""
    match = _RATE.match(text)
    if not match:
        raise UsageError(f"rate: cannot read {text!r}: use e.g. 500k, 100M or 1g")
    value = float(match.group(1)) * _RATE_SCALE[match.group(2).lower()]
    if value < 1:
        raise UsageError(f"rate: {text!r} is below 1 kbit/s")
    return int(value)


def _transfer_options(func: Any) -> Any:
    options = [
        click.option("--spec", "spec_file", help="Run a whole TransferSpec JSON (FILE or -)."),
        click.option("--host", help="Server host (or use [user@]host:path)."),
        click.option("--user", help="Transfer user."),
        click.option("-P", "ssh_port", type=int, help="SSH control port (default 33001)."),
        click.option("-O", "fasp_port", type=int, help="UDP data port (default 33001)."),
        click.option("-l", "target_rate", help="Target rate: 500k, 100M, 1g (plain: kbit/s)."),
        click.option("-m", "min_rate", help="Minimum rate, same units as -l."),
        click.option("--policy", type=click.Choice(["fixed", "high", "fair", "low"])),
        click.option("-c", "cipher", help="Cipher: aes-128 (default), aes-192, aes-256, none."),
        click.option(
            "-T", "no_encryption", is_flag=True, help="No encryption (still authenticated)."
        ),
        click.option("-d", "create_dir", is_flag=True, help="Create the destination folder."),
        click.option("-Z", "dgram_size", type=int, help="IP datagram size in bytes."),
        click.option("-i", "key_files", multiple=True, help="SSH private key file (repeatable)."),
        click.option("--sshfp", help="Pin the server's host key fingerprint (SHA256:...)."),
        click.option("--accept-host-key", is_flag=True, help="Trust and remember a new host key."),
        click.option("--known-hosts", type=click.Path(dir_okay=False), help="known_hosts file."),
        click.option("--file-list", type=click.Path(dir_okay=False), help="One source per line."),
        click.option(
            "--file-pair-list",
            type=click.Path(dir_okay=False),
            help="Alternating source and destination lines.",
        ),
        click.option(
            "--overwrite", type=click.Choice(["never", "always", "diff", "older", "diff+older"])
        ),
        click.option("-p", "preserve_times", is_flag=True, help="Preserve modification times."),
        click.option("--json-events", is_flag=True, help="One JSON event per line on stdout."),
        click.option(
            "--udp-timeout",
            type=float,
            default=10.0,
            show_default=True,
            help="Seconds to wait for the first UDP reply before reporting a block.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command()
@click.argument("args", nargs=-1)
@_transfer_options
def send(args: tuple[str, ...], **opts: Any) -> None:
    """Upload: slipstream send [options] SRC... [[user@]host:]DEST"""
    _run_cli_transfer("send", args, opts)


@main.command()
@click.argument("args", nargs=-1)
@_transfer_options
def recv(args: tuple[str, ...], **opts: Any) -> None:
    """Download: slipstream recv [options] [[user@]host:]SRC... DEST"""
    _run_cli_transfer("receive", args, opts)


def _run_cli_transfer(direction: str, args: tuple[str, ...], opts: dict[str, Any]) -> None:
    from slipstream.cli_transfer import build_cli_spec, run_with_progress

    try:
        spec, client = build_cli_spec(direction, args, opts)
        result = run_with_progress(spec, client, json_events=opts["json_events"])
    except SlipstreamError as exc:
        fail(exc)
    sys.exit(0 if result.ok else EXIT_FAILED)


# --- demo ------------------------------------------------------------------------------


@main.command()
@click.option(
    "--dir",
    "work_dir",
    type=click.Path(file_okay=False),
    help="Where to put the demo server and files (default: a temporary folder).",
)
@click.option("--size", default="256M", show_default=True, help="Size of the big sample file.")
def demo(work_dir: str | None, size: str) -> None:
    """Start a quickstart server, send sample files to it and back, and print the rates."""
    from slipstream.demo import run_demo

    try:
        run_demo(Path(work_dir) if work_dir else None, size)
    except SlipstreamError as exc:
        fail(exc)


def env_password() -> str | None:
    return os.environ.get("SLIPSTREAM_PASSWORD") or None
