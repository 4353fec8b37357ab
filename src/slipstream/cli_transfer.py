"""`slipstream send|recv`: ascp-style arguments to a TransferSpec, and progress on a terminal."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from slipstream.cli_files import file_fields, passphrase
from slipstream.engine.filelists import read_file_list, read_file_pair_list
from slipstream.engine.job import ClientOptions, TransferResult, transfer
from slipstream.errors import UsageError
from slipstream.spec import TransferSpec, load_transfer_spec, parse_transfer_spec_json
from slipstream.transport.shared import persist_from_env

_REMOTE = re.compile(r"^(?:(?P<user>[^@/:]+)@)?(?P<host>\[[^\]]+\]|[^:/\[\]]+):(?P<path>.*)$")

# Flag name -> spec field, for flags that map one to one.
_DIRECT_FIELDS = {
    "ssh_port": "ssh_port",
    "fasp_port": "fasp_port",
    "policy": "rate_policy",
    "cipher": "cipher",
    "dgram_size": "dgram_size",
    "sshfp": "sshfp",
    "overwrite": "overwrite",
}


def split_remote(text: str) -> tuple[str | None, str, str] | None:
    """``[user@]host:path`` -> (user, host, path); None for a plain local path."""
    match = _REMOTE.match(text)
    if not match or len(match.group("host")) < 1:
        return None
    host = match.group("host").strip("[]")
    return match.group("user"), host, match.group("path")


def build_cli_spec(
    direction: str, args: tuple[str, ...], opts: dict[str, Any]
) -> tuple[TransferSpec, ClientOptions]:
    from slipstream.cli import parse_rate_kbps

    body = _spec_from_file(opts["spec_file"], args) if opts["spec_file"] else {}
    if not opts["spec_file"]:
        body.update(_spec_from_args(direction, list(args), opts))
    body.setdefault("direction", direction)
    if opts["host"]:
        body["remote_host"] = opts["host"]
    if opts["user"]:
        body["remote_user"] = opts["user"]
    for flag, field_name in _DIRECT_FIELDS.items():
        if opts.get(flag) is not None:
            body[field_name] = opts[flag]
    if opts["no_encryption"]:
        body["cipher"] = "none"
    if opts["target_rate"]:
        body["target_rate_kbps"] = parse_rate_kbps(opts["target_rate"])
    if opts["min_rate"]:
        body["min_rate_kbps"] = parse_rate_kbps(opts["min_rate"])
    if opts["create_dir"]:
        body["create_dir"] = True
    if opts["preserve_times"]:
        body["preserve_times"] = True
    body.update(file_fields(opts))
    if body.get("content_protection") and not body.get("content_protection_passphrase"):
        # Never on the command line (it would show in `ps`): the environment or a prompt.
        body["content_protection_passphrase"] = passphrase(
            confirm=body["content_protection"] == "encrypt"
        )
    spec = load_transfer_spec(body)
    return spec, _client_options(spec, opts)


def _spec_from_file(spec_file: str, args: tuple[str, ...]) -> dict[str, Any]:
    if args:
        raise UsageError("--spec takes the paths from the spec: give no SRC/DEST arguments")
    try:
        text = sys.stdin.read() if spec_file == "-" else Path(spec_file).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {spec_file}: {exc}") from None
    return parse_transfer_spec_json(text).to_json_dict()


def _spec_from_args(direction: str, args: list[str], opts: dict[str, Any]) -> dict[str, Any]:
    listed = _listed_paths(opts)
    if not args:
        raise UsageError("missing DEST: slipstream send|recv [options] SRC... DEST")
    dest, sources = args[-1], args[:-1]
    if not sources and not listed:
        raise UsageError("missing SRC: give at least one source (or --file-list)")
    body: dict[str, Any] = {}
    remote_side = [dest] if direction == "send" else sources
    remote_side = [_strip_remote(item, body, opts) for item in remote_side]
    if direction == "send":
        dest = remote_side[0]
    else:
        sources = remote_side
    paths = [{"source": s} for s in sources] + listed
    body["paths"] = paths
    body["destination_root"] = dest
    return body


def _strip_remote(item: str, body: dict[str, Any], opts: dict[str, Any]) -> str:
    if opts["host"]:
        return item
    parsed = split_remote(item)
    if parsed is None:
        return item
    user, host, path = parsed
    if body.get("remote_host", host) != host:
        raise UsageError(f"all remote paths must be on one host ({body['remote_host']} vs {host})")
    body["remote_host"] = host
    if user:
        body["remote_user"] = user
    return path or "."


def _listed_paths(opts: dict[str, Any]) -> list[dict[str, str]]:
    if opts["file_list"] and opts["file_pair_list"]:
        raise UsageError("use --file-list or --file-pair-list, not both")
    if opts["file_list"]:
        return [{"source": src} for src, _ in read_file_list(Path(opts["file_list"]))]
    if opts["file_pair_list"]:
        return [
            {"source": src, "destination": dst or ""}
            for src, dst in read_file_pair_list(Path(opts["file_pair_list"]))
        ]
    return []


def _client_options(spec: TransferSpec, opts: dict[str, Any]) -> ClientOptions:
    password = os.environ.get("SLIPSTREAM_PASSWORD") or None
    keys = list(opts["key_files"])
    if _needs_password_prompt(spec, password, keys):
        password = getpass.getpass(f"Password for {spec.remote_user}@{spec.remote_host}: ")
    return ClientOptions(
        password=password,
        key_files=keys,
        known_hosts=Path(opts["known_hosts"]) if opts["known_hosts"] else None,
        accept_new_host=bool(opts["accept_host_key"]),
        udp_timeout=float(opts["udp_timeout"]),
        control_socket=_control_socket(opts),
        persist=opts["persist"] if opts.get("persist") is not None else persist_from_env(),
    )


def _needs_password_prompt(spec: TransferSpec, password: str | None, keys: list[str]) -> bool:
    """Ask only when nothing else can log in: a token, a key or a known password all can."""
    if password or keys or spec.remote_password or not sys.stdin.isatty():
        return False
    has_key = bool(getattr(spec, "ssh_private_key_path", None))
    return spec.authentication != "token" and not has_key


def _control_socket(opts: dict[str, Any]) -> Path:
    """Where `slipstream modify` finds this transfer (engine/livecontrol.py)."""
    from slipstream.engine.livecontrol import default_socket_path

    chosen = opts.get("control_socket")
    return Path(chosen) if chosen else default_socket_path()


def run_with_progress(
    spec: TransferSpec, client: ClientOptions, *, json_events: bool
) -> TransferResult:
    if json_events:
        return asyncio.run(transfer(spec, _print_json, client))
    if sys.stderr.isatty():
        from slipstream.progress import TerminalProgress

        with TerminalProgress() as progress:
            result = asyncio.run(transfer(spec, progress.on_event, client))
    else:
        result = asyncio.run(transfer(spec, _print_problems, client))
    print(summary_line(result))
    return result


def _print_json(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _print_problems(event: dict[str, Any]) -> None:
    if event.get("type") == "file_error":
        error = event.get("error", {})
        print(f"failed: {event.get('path')}: {error.get('user_message', error)}", file=sys.stderr)


def summary_line(result: TransferResult) -> str:
    totals = result.totals.as_dict()
    return (
        f"Completed: {totals['files_done']} files, {totals['files_skipped']} skipped, "
        f"{totals['files_failed']} failed; {_human_bytes(totals['bytes'])} in "
        f"{totals['elapsed_s']:.2f} s = {totals['rate_bps'] / 1e6:.1f} Mbit/s"
    )


def _human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"
