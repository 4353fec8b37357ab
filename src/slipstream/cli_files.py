"""CLI options for what happens to files (ascp's names), and `slipstream encrypt|decrypt`.

Kept apart from cli_transfer.py so that defining the options imports nothing heavy: the
``send``/``recv`` commands are decorated when ``slipstream.cli`` is imported.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from slipstream.errors import SlipstreamError, UsageError

FILEPASS_ENV = "SLIPSTREAM_FILEPASS"
_RULES_ORDER = "slipstream.filter_rule_order"


class TransferCommand(click.Command):
    """A command that remembers the order of its ``-E`` / ``-N`` options.

    Click collects each option's values separately, which loses how ``-E`` and ``-N``
    interleave; first-match-wins filter rules need exactly that order. The parser reports
    every option occurrence in order, so it is captured here.
    """

    def make_parser(self, ctx: click.Context) -> Any:
        parser = super().make_parser(ctx)
        parse_args = parser.parse_args

        def parse_in_order(args: list[str]) -> Any:
            opts, largs, order = parse_args(args)
            names = [param.name for param in order if param.name in ("exclude", "include")]
            ctx.meta[_RULES_ORDER] = names
            return opts, largs, order

        parser.parse_args = parse_in_order  # type: ignore[method-assign]
        return parser


def file_options(func: Any) -> Any:
    """The file-semantics options of ``send`` and ``recv``."""
    options = [
        click.option(
            "-k",
            "resume_level",
            type=click.Choice(["0", "1", "2", "3"]),
            help="Resume: 0 none, 1 size+mtime, 2 sparse checksum (default), 3 full checksum.",
        ),
        click.option(
            "--save-before-overwrite",
            is_flag=True,
            help="Rename a file about to be replaced to NAME.YYYY.MM.DD.hh.mm.ss.N.EXT first.",
        ),
        click.option("--preserve-modification-time", is_flag=True, help="Keep source mtimes."),
        click.option("--preserve-access-time", is_flag=True, help="Keep source access times."),
        click.option(
            "--symbolic-links",
            type=click.Choice(["follow", "copy", "copy+force", "skip"]),
            help="Links: follow (default), copy as links, copy+force (replace files), skip.",
        ),
        click.option(
            "-E", "exclude", multiple=True, metavar="PATTERN", help="Exclude matching paths."
        ),
        click.option(
            "-N", "include", multiple=True, metavar="PATTERN", help="Include matching paths."
        ),
        click.option(
            "--exclude-newer-than",
            metavar="TIME",
            help="Skip files modified after TIME (epoch s; -S: S seconds ago; ISO-8601).",
        ),
        click.option(
            "--exclude-older-than", metavar="TIME", help="Skip files modified before TIME."
        ),
        click.option("--remove-after-transfer", is_flag=True, help="Delete sources once sent."),
        click.option(
            "--remove-empty-directories", is_flag=True, help="Then remove emptied source folders."
        ),
        click.option("--remove-skipped", is_flag=True, help="Also delete skipped sources."),
        click.option(
            "--move-after-transfer", metavar="DIR", help="Move sources into DIR once sent."
        ),
        click.option(
            "--delete-before-transfer",
            is_flag=True,
            help="Delete destination files the source folder does not have (mirror).",
        ),
        click.option(
            "--file-checksum", metavar="ALGO", help="Report md5|sha1|sha256|sha384|sha512."
        ),
        click.option(
            "--file-crypt",
            type=click.Choice(["encrypt", "decrypt"]),
            help=f"Encrypt uploads at rest / decrypt downloads (passphrase: ${FILEPASS_ENV}).",
        ),
        click.option("--cookie", help="Opaque text shown to the server (logs, events)."),
        click.option("--tags", help="JSON object of metadata for the server (logs, events)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


_FLAG_FIELDS = {
    "save_before_overwrite": "save_before_overwrite",
    "preserve_modification_time": "preserve_modification_time",
    "preserve_access_time": "preserve_access_time",
    "remove_after_transfer": "remove_after_transfer",
    "remove_empty_directories": "remove_empty_directories",
    "remove_skipped": "remove_skipped",
    "delete_before_transfer": "delete_before_transfer",
}
_VALUE_FIELDS = {
    "symbolic_links": "symlink_policy",
    "move_after_transfer": "move_after_transfer",
    "file_checksum": "file_checksum",
    "file_crypt": "content_protection",
    "cookie": "cookie",
}


def file_fields(opts: dict[str, Any]) -> dict[str, Any]:
    """Spec fields for the options that were given (absent ones leave the spec alone)."""
    body: dict[str, Any] = {}
    if opts.get("resume_level") is not None:
        body["resume"] = int(opts["resume_level"])
    for flag, name in _FLAG_FIELDS.items():
        if opts.get(flag):
            body[name] = True
    for option, name in _VALUE_FIELDS.items():
        if opts.get(option) is not None:
            body[name] = opts[option]
    for option in ("exclude_newer_than", "exclude_older_than"):
        if opts.get(option) is not None:
            body[option] = _time_value(opts[option])
    if opts.get("tags") is not None:
        body["tags"] = _tags(opts["tags"])
    rules = filter_rules(opts)
    if rules:
        body["filters"] = rules
    return body


def filter_rules(opts: dict[str, Any]) -> list[str]:
    """``-E``/``-N`` as ordered ``"- glob"`` / ``"+ glob"`` rules, in command-line order."""
    excludes, includes = list(opts.get("exclude") or ()), list(opts.get("include") or ())
    context = click.get_current_context(silent=True)
    order = context.meta.get(_RULES_ORDER) if context is not None else None
    if order is None:  # called without our command class: includes first (the safe reading)
        order = ["include"] * len(includes) + ["exclude"] * len(excludes)
    rules = []
    for name in order:
        source = includes if name == "include" else excludes
        rules.append(("+ " if name == "include" else "- ") + source.pop(0))
    return rules


def _time_value(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text  # an ISO-8601 time; the spec validates it


def _tags(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--tags must be a JSON object: {exc.msg}") from None


def passphrase(confirm: bool) -> str:
    """The content-protection passphrase: $SLIPSTREAM_FILEPASS, else a prompt on a terminal."""
    value = os.environ.get(FILEPASS_ENV)
    if value:
        return value
    if not sys.stdin.isatty():
        raise UsageError(f"Content protection needs a passphrase: set {FILEPASS_ENV}")
    first = getpass.getpass("Content protection passphrase: ")
    if confirm and getpass.getpass("Again: ") != first:
        raise UsageError("The passphrases do not match")
    if not first:
        raise UsageError("The passphrase is empty")
    return first


# --- slipstream encrypt | decrypt ----------------------------------------------------------------


def _convert_files(
    files: tuple[str, ...], output_dir: str | None, force: bool, encrypt: bool
) -> int:
    from slipstream.engine.envelope import DEFAULT_EXTENSION, Keyring, decrypt_file, encrypt_file

    keyring = Keyring(passphrase(confirm=encrypt))
    failures = 0
    for name in files:
        source = Path(name)
        try:
            target = _target_for(source, output_dir, encrypt, DEFAULT_EXTENSION)
            if target.exists() and not force:
                raise UsageError(f"{target} exists (use --force to replace it)")
            convert = encrypt_file if encrypt else decrypt_file
            size = convert(source, target, keyring)
        except SlipstreamError as exc:
            click.echo(f"error: {source}: {exc.user_message} (code {exc.code})", err=True)
            failures += 1
            continue
        except OSError as exc:
            where = exc.filename or source
            click.echo(f"error: {where}: {exc.strerror or exc}", err=True)
            failures += 1
            continue
        click.echo(f"{source} -> {target} ({size} bytes)")
    return failures


def _target_for(source: Path, output_dir: str | None, encrypt: bool, extension: str) -> Path:
    if encrypt:
        name = source.name + extension
    elif source.name.endswith(extension) and len(source.name) > len(extension):
        name = source.name[: -len(extension)]
    else:
        raise UsageError(f"{source} does not end in {extension}")
    return (Path(output_dir) if output_dir else source.parent) / name


@click.command("decrypt")
@click.argument("files", nargs=-1, required=True)
@click.option(
    "-o", "--output-dir", type=click.Path(file_okay=False), help="Write plain files here."
)
@click.option("--force", is_flag=True, help="Replace existing plain files.")
def decrypt_command(files: tuple[str, ...], output_dir: str | None, force: bool) -> None:
    """Decrypt content-protected files (NAME.aspera-env -> NAME) offline.

    The passphrase comes from $SLIPSTREAM_FILEPASS or a prompt. A wrong passphrase or a damaged
    file is an error and writes nothing.
    """
    sys.exit(1 if _convert_files(files, output_dir, force, encrypt=False) else 0)


@click.command("encrypt")
@click.argument("files", nargs=-1, required=True)
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), help="Write envelopes here.")
@click.option("--force", is_flag=True, help="Replace existing envelopes.")
def encrypt_command(files: tuple[str, ...], output_dir: str | None, force: bool) -> None:
    """Encrypt files at rest (NAME -> NAME.aspera-env), as an encrypting upload stores them."""
    sys.exit(1 if _convert_files(files, output_dir, force, encrypt=True) else 0)
