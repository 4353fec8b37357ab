"""The `slipstream` command: send | recv | serve | spec | token | doctor | agent | demo.

Exit codes: 0 success; 1 the transfer failed or some files failed; 2 bad usage or an invalid
spec (nothing was transferred).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
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
from slipstream.cli_files import TransferCommand, decrypt_command, encrypt_command, file_options
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
@click.option("--api-port", type=int, help="Override the REST API HTTPS port (0: any free port).")
@click.option("--fallback-port", type=int, help="Override the HTTPS fallback port (0: any).")
def serve(
    config_path: str | None,
    quickstart_dir: str | None,
    listen: str | None,
    ssh_port: int | None,
    fasp_port: int | None,
    api_port: int | None,
    fallback_port: int | None,
) -> None:
    """Run the transfer server. With --quickstart, print one JSON line once it is ready."""
    from slipstream.server.app import serve_forever

    if (config_path is None) == (quickstart_dir is None):
        fail(UsageError("give either --config FILE or --quickstart DIR"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config, extra = _server_config(config_path, quickstart_dir, listen)
        config = _override_ports(config, ssh_port, fasp_port)
        config = _override_http_ports(config, api_port, fallback_port)

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
            Path(quickstart_dir),
            listen=listen or "127.0.0.1",
            ssh_port=33001,
            fasp_port=33001,
            api_port=9092,
            fallback_port=8443,
        )
        config = load_server_config(info.config_path)
        extra: dict[str, Any] = {
            "user": info.user,
            "password": info.password,
            "docroot": str(info.docroot),
        }
        if info.api_user:
            extra.update(api_user=info.api_user, api_password=info.api_password)
        return config, extra
    config = load_server_config(config_path or "")
    if listen:
        config = dataclasses.replace(config, listen=listen)
    return config, {}


def _override_ports(config: Any, ssh_port: int | None, fasp_port: int | None) -> Any:
    import dataclasses

    changes = {k: v for k, v in (("ssh_port", ssh_port), ("fasp_port", fasp_port)) if v is not None}
    return dataclasses.replace(config, **changes) if changes else config


def _override_http_ports(config: Any, api_port: int | None, fallback_port: int | None) -> Any:
    import dataclasses

    if api_port is not None:
        api = dataclasses.replace(config.api, https_port=api_port)
        config = dataclasses.replace(config, api=api)
    if fallback_port is not None:
        fallback = dataclasses.replace(config.http_fallback, port=fallback_port)
        config = dataclasses.replace(config, http_fallback=fallback)
    return config


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
        click.option(
            "--persist",
            type=click.FloatRange(min=0),
            metavar="SECONDS",
            help="Keep the SSH login this many seconds for the next transfers to this server, "
            "and reuse one kept by an earlier transfer (default: $SLIPSTREAM_PERSIST, else 0).",
        ),
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
            "--control-socket",
            type=click.Path(dir_okay=False),
            help="Where `slipstream modify` reaches this transfer (default: a per-user folder).",
        ),
        click.option(
            "--udp-timeout",
            type=float,
            default=10.0,
            show_default=True,
            help="Seconds to wait for the first UDP reply before reporting a block.",
        ),
        click.option(
            "--http-fallback",
            type=click.Choice(["on", "force"]),
            help="on: use the server's HTTPS fallback if UDP is blocked; force: HTTPS only.",
        ),
        click.option("--fallback-port", type=int, help="The server's HTTPS fallback port."),
        click.option(
            "--fallback-fingerprint",
            help="Pin the fallback's TLS certificate (SHA256:..., printed by slipstream serve).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command(cls=TransferCommand)
@click.argument("args", nargs=-1)
@_transfer_options
@file_options
def send(args: tuple[str, ...], **opts: Any) -> None:
    """Upload: slipstream send [options] SRC... [[user@]host:]DEST"""
    _run_cli_transfer("send", args, opts)


@main.command(cls=TransferCommand)
@click.argument("args", nargs=-1)
@_transfer_options
@file_options
def recv(args: tuple[str, ...], **opts: Any) -> None:
    """Download: slipstream recv [options] [[user@]host:]SRC... DEST"""
    _run_cli_transfer("receive", args, opts)


main.add_command(decrypt_command)
main.add_command(encrypt_command)


def _run_cli_transfer(direction: str, args: tuple[str, ...], opts: dict[str, Any]) -> None:
    from slipstream.cli_transfer import build_cli_spec, run_with_progress

    try:
        spec, client = build_cli_spec(direction, args, opts)
        spec = _with_fallback_options(spec, opts)
        result = run_with_progress(spec, client, json_events=opts["json_events"])
    except SlipstreamError as exc:
        fail(exc)
    _exit_now(0 if result.ok else EXIT_FAILED)


def _exit_now(code: int) -> NoReturn:
    """End a finished transfer without the interpreter's teardown of every module and
    object (~0.1 s, a round trip's worth on a WAN, for nothing): exit handlers still run
    and output is flushed first."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _with_fallback_options(spec: Any, opts: dict[str, Any]) -> Any:
    from slipstream.spec import load_transfer_spec

    changes: dict[str, Any] = {}
    if opts.get("http_fallback"):
        changes["http_fallback"] = "force" if opts["http_fallback"] == "force" else True
    if opts.get("fallback_port") is not None:
        changes["https_fallback_port"] = opts["fallback_port"]
    if opts.get("fallback_fingerprint"):
        changes["https_fallback_fingerprint"] = opts["fallback_fingerprint"]
    return load_transfer_spec({**spec.to_json_dict(), **changes}) if changes else spec


# --- token / doctor --------------------------------------------------------------------


@main.group()
def token() -> None:
    """Create and inspect transfer tokens (administrators; needs the server config)."""


@token.command("create")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--user", required=True, help="The transfer user the token logs in as.")
@click.option("--upload", "upload_to", help="Authorize uploads into this folder.")
@click.option("--download", multiple=True, help="Authorize downloading this path (repeatable).")
@click.option("--source-root", help="Folder the --download paths are relative to.")
@click.option("--life", type=int, help="Seconds until it expires (default: the server's).")
@click.option("--json", "as_json", is_flag=True, help="Print the token and its claims as JSON.")
def token_create(
    config_path: str,
    user: str,
    upload_to: str | None,
    download: tuple[str, ...],
    source_root: str | None,
    life: int | None,
    as_json: bool,
) -> None:
    """Print a token for one upload destination or a set of download sources."""
    from slipstream.server.config import load_server_config
    from slipstream.server.tokens import admin_create

    try:
        config = load_server_config(config_path)
        value, claims = admin_create(
            config,
            user=user,
            upload_to=upload_to,
            download=list(download),
            source_root=source_root,
            life_seconds=life,
        )
    except SlipstreamError as exc:
        fail(exc)
    if as_json:
        click.echo(json.dumps({"token": value, **claims.describe()}, indent=2))
    else:
        click.echo(value)


@token.command("inspect")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.argument("value", metavar="TOKEN")
def token_inspect(config_path: str, value: str) -> None:
    """Decrypt TOKEN (or - for stdin) and print what it authorizes; exit 1 if refused."""
    from slipstream.server.config import load_server_config
    from slipstream.server.tokens import admin_inspect

    text = sys.stdin.read().strip() if value == "-" else value.strip()
    try:
        claims, problem = admin_inspect(load_server_config(config_path), text)
    except SlipstreamError as exc:
        fail(exc)
    click.echo(json.dumps({**claims, "valid": problem is None, "problem": problem}, indent=2))
    sys.exit(0 if problem is None else EXIT_FAILED)


@main.command()
@click.argument("target", metavar="[USER@]HOST")
@click.option("-P", "ssh_port", type=int, default=33001, show_default=True, help="SSH port.")
@click.option("-O", "fasp_port", type=int, default=33001, show_default=True, help="UDP port.")
@click.option("--fallback-port", type=int, default=8443, show_default=True, help="HTTPS port.")
@click.option("--timeout", type=float, default=3.0, show_default=True, help="Seconds per check.")
@click.option("--sshfp", help="Pinned host key, for the login check.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(
    target: str,
    ssh_port: int,
    fasp_port: int,
    fallback_port: int,
    timeout: float,
    sshfp: str | None,
    as_json: bool,
) -> None:
    """Check what passes to a server: SSH, UDP (a real round trip), HTTPS fallback, MTU."""
    from slipstream.doctor import diagnose

    user, _, host = target.rpartition("@")
    report = asyncio.run(
        diagnose(
            host.strip("[]"),
            ssh_port=ssh_port,
            fasp_port=fasp_port,
            fallback_port=fallback_port,
            timeout=timeout,
            user=user or None,
            password=env_password(),
            sshfp=sshfp,
        )
    )
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.text())
    sys.exit(0 if report.ok else EXIT_FAILED)


# --- modify ----------------------------------------------------------------------------


@main.command()
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), help="Control socket.")
@click.option("--pid", type=int, help="Process id of the running send/recv.")
@click.option("-l", "target_rate", help="New target rate: 500k, 100M, 1g (plain: kbit/s).")
@click.option("-m", "min_rate", help="New minimum rate, same units as -l.")
@click.option("--policy", type=click.Choice(["fixed", "high", "fair", "low"]))
def modify(
    socket_path: str | None,
    pid: int | None,
    target_rate: str | None,
    min_rate: str | None,
    policy: str | None,
) -> None:
    """Change a running transfer's rate live (no option: show its settings)."""
    from slipstream.engine.livecontrol import (
        SOCKET_SUFFIX,
        default_socket_dir,
        request,
        running_sockets,
    )

    try:
        if socket_path:
            path = Path(socket_path)
        elif pid is not None:
            path = default_socket_dir() / f"{pid}{SOCKET_SUFFIX}"
        else:
            found = running_sockets()
            if len(found) != 1:
                names = ", ".join(p.stem for p in found) or "none"
                raise UsageError(f"{len(found)} running transfers ({names}): give --pid")
            path = found[0]
        body: dict[str, Any] = {"op": "status"}
        change = {
            "target_rate_kbps": parse_rate_kbps(target_rate) if target_rate else None,
            "min_rate_kbps": parse_rate_kbps(min_rate) if min_rate else None,
            "rate_policy": policy,
        }
        if any(value is not None for value in change.values()):
            body = {"op": "set", **change}
        click.echo(json.dumps(request(path, body), indent=2))
    except SlipstreamError as exc:
        fail(exc)


@main.command()
@click.option("--stop", is_flag=True, help="Close every kept login.")
def logins(stop: bool) -> None:
    """List the SSH logins kept by `--persist` (one line each), or close them."""
    import asyncio

    from slipstream.transport.shared import ask_master, master_sockets

    for path in master_sockets():
        info = asyncio.run(ask_master(path, "info"))
        if info is None:
            continue  # stale: its master is gone, the next one replaces the socket
        line = (
            f"{info['user']}@{info['server']}  pid {info['pid']}  "
            f"streams {info['streams']}  idle limit {info['persist_s']:g} s"
        )
        if stop:
            stopped = asyncio.run(ask_master(path, "exit"))
            line += "  closed" if stopped else "  (did not answer)"
        click.echo(line)


# --- agent -----------------------------------------------------------------------------


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False), help="History database folder.")
@click.option("--download-dir", type=click.Path(file_okay=False), help="Where downloads land.")
@click.option("--max-concurrent", type=int, default=3, show_default=True)
@click.option("--retries", type=int, default=3, show_default=True, help="Retry attempts.")
@click.option("--retry-interval", type=float, default=30.0, show_default=True, help="Seconds.")
@click.option(
    "--dialogs",
    type=click.Choice(["auto", "tk", "headless"]),
    default="auto",
    show_default=True,
    help="Native Tk dialogs, or the headless policy (auto: Tk when a display exists).",
)
@click.option(
    "--headless-folder",
    type=click.Path(file_okay=False),
    help="Without a display, dialogs pick from this folder (else they are cancelled).",
)
@click.option("--trust", "trusted", multiple=True, help="Folder any page may upload from.")
@click.option("--drop-folder", "drop_folders", multiple=True, help="Folder dropped files match.")
@click.option("--allow-origin", "origins", multiple=True, help="Only these web origins.")
@click.option("--max-rate", "max_rate", help="Cap for modify (500k, 100M, 1g).")
@click.option("--ports", default="33003-33022", show_default=True, help="Port range to try.")
def agent(**opts: Any) -> None:
    """The Connect-compatible local agent for web pages (prints one JSON line when ready)."""
    from slipstream.agent.app import run_agent

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = _agent_config(opts)

        def ready(info: dict[str, Any]) -> None:
            click.echo(json.dumps(info))
            sys.stdout.flush()

        asyncio.run(run_agent(config, ready))
    except SlipstreamError as exc:
        fail(exc)
    except KeyboardInterrupt:
        pass


def _agent_config(opts: dict[str, Any]) -> Any:
    from slipstream.agent.config import AgentConfig

    config = AgentConfig(
        max_concurrent=opts["max_concurrent"],
        retry_attempts=opts["retries"],
        retry_interval=opts["retry_interval"],
        dialogs=opts["dialogs"],
        trusted_folders=[Path(p).resolve() for p in opts["trusted"]],
        drop_folders=[Path(p).resolve() for p in opts["drop_folders"]],
        allowed_origins=list(opts["origins"]) or None,
        ports=_port_range(opts["ports"]),
    )
    if opts["data_dir"]:
        config.data_dir = Path(opts["data_dir"]).resolve()
    if opts["download_dir"]:
        config.download_dir = Path(opts["download_dir"]).resolve()
    if opts["headless_folder"]:
        config.headless_folder = Path(opts["headless_folder"]).resolve()
    if opts["max_rate"]:
        config.max_target_rate_kbps = parse_rate_kbps(opts["max_rate"])
    return config


def _port_range(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    try:
        return int(first), int(last or first)
    except ValueError:
        raise UsageError(f"--ports: cannot read {text!r}; use e.g. 33003-33022") from None


# --- demo ------------------------------------------------------------------------------


@main.command()
@click.option(
    "--dir",
    "work_dir",
    type=click.Path(file_okay=False),
    help="Where to put the demo server and files (default: a temporary folder).",
)
@click.option("--size", help="Size of the big sample file (default: 16M, with --cli 256M).")
@click.option("--cli", "cli_only", is_flag=True, help="The command-line round trip instead.")
@click.option("--port", default=0, show_default=True, help="Web page port (0: any free one).")
@click.option("--exit-after", type=float, help="Stop after this many seconds (smoke tests).")
def demo(
    work_dir: str | None, size: str | None, cli_only: bool, port: int, exit_after: float | None
) -> None:
    """Start a quickstart server, the agent and a web page that transfers with them through
    the official Connect SDK; print the URL to open. With --cli: send sample files to the
    server and back from the command line, and print the rates."""
    root = Path(work_dir) if work_dir else None
    try:
        if cli_only:
            from slipstream.demo import run_demo

            run_demo(root, size or "256M")
            return
        from slipstream.webdemo.run import run_web_demo

        run_web_demo(root, size or "16M", port, exit_after)
    except SlipstreamError as exc:
        fail(exc)
    except KeyboardInterrupt:
        pass


def env_password() -> str | None:
    return os.environ.get("SLIPSTREAM_PASSWORD") or None
