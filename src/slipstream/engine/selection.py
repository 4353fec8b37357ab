"""Which sources a transfer sends: filter rules, time windows and the symbolic-link policy.

:func:`select_sources` wraps :func:`~slipstream.engine.paths.expand_sources` and yields what
to send, interleaved with :class:`LeftOut` notes for what it left out, so the sender can report
both in order. It runs on the sending side (the client for an upload, the server for a
download) and never touches a file it does not send.

Filter rules are ascp's ``-E PATTERN`` (exclude) and ``-N PATTERN`` (include), evaluated in
the order given; the first rule that matches decides, and a path no rule matches is sent.
An excluded folder is not entered. Patterns are matched against the path as it will appear
below the destination (``tree/sub/file.txt`` for a folder source ``tree``):

* ``*`` matches within one path component, ``?`` one character, ``[a-z]`` / ``[!a-z]`` a
  class, ``\\`` escapes the next character, ``**`` matches across components (``a/**/b``
  matches ``a/b`` and ``a/x/y/b``);
* a leading ``/`` anchors the pattern at the top of the transfer; otherwise it may match the
  end of the path at any depth (a pattern without ``/`` thus matches the file name);
* a trailing ``/`` makes the rule apply to folders only.

So ``-N '*/' -E '*.tmp'`` keeps every folder and drops temporary files, and the idiom
``-N '/**/' -N '*.txt' -E '/**'`` sends only text files, in their folders.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from slipstream.engine.paths import SourceEntry, expand_sources
from slipstream.errors import UsageError
from slipstream.spec import TransferSpec

T = TypeVar("T")
PREFETCH_BATCH = 256


@dataclass(frozen=True)
class LeftOut:
    """A source the sender does not send, and why."""

    path: str
    reason: str
    excluded: bool  # True: a filter rule or time window; False: skipped (links, specials...)
    # Shaped like a SourceEntry where generic code looks (multi_session shares assign each
    # note to one session, so it is reported once).
    kind = "note"
    size = 0


# --- filter rules -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterRule:
    include: bool
    pattern: str
    regex: re.Pattern[str]
    dirs_only: bool

    @property
    def text(self) -> str:
        return f"{'-N' if self.include else '-E'} {self.pattern}"


def _class_end(glob: str, start: int) -> int:
    """Index of the ``]`` closing the class opened at ``start``, or -1."""
    index = start + 1
    if index < len(glob) and glob[index] in "!^":
        index += 1
    if index < len(glob) and glob[index] == "]":
        index += 1
    end = glob.find("]", index)
    return end


def _translate(glob: str) -> str:
    """A glob body (no leading/trailing slash handling) as a regular expression."""
    out: list[str] = []
    index = 0
    while index < len(glob):
        char = glob[index]
        if glob.startswith("**/", index):
            out.append("(?:.*/)?")
            index += 3
        elif glob.startswith("**", index):
            out.append(".*")
            index += 2
        elif char == "*":
            out.append("[^/]*")
            index += 1
        elif char == "?":
            out.append("[^/]")
            index += 1
        elif char == "\\" and index + 1 < len(glob):
            out.append(re.escape(glob[index + 1]))
            index += 2
        elif char == "[" and (end := _class_end(glob, index)) > 0:
            body = glob[index + 1 : end]
            negate = body[:1] in ("!", "^")
            body = body[1:] if negate else body
            out.append("[" + ("^" if negate else "") + body.replace("\\", "\\\\") + "]")
            index = end + 1
        else:
            out.append(re.escape(char))
            index += 1
    return "".join(out)


def compile_rule(include: bool, pattern: str) -> FilterRule:
    body = pattern
    dirs_only = len(body) > 1 and body.endswith("/")
    if dirs_only:
        body = body[:-1]
    anchored = body.startswith("/")
    body = body.lstrip("/") if anchored else body
    prefix = "" if anchored else "(?:.*/)?"
    try:
        regex = re.compile(prefix + _translate(body), re.DOTALL)
    except re.error as exc:
        raise UsageError(f"Filter pattern {pattern!r} is not a valid glob: {exc}") from None
    return FilterRule(include, pattern, regex, dirs_only)


class FilterRules:
    """An ordered rule list; the first matching rule decides."""

    def __init__(self, rules: Sequence[FilterRule]) -> None:
        self.rules = list(rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    @classmethod
    def from_spec(cls, spec: TransferSpec) -> FilterRules:
        rules = [compile_rule(*parse_rule_text(text)) for text in spec_filters(spec)]
        rules += [compile_rule(True, p) for p in spec.include_patterns or ()]
        rules += [compile_rule(False, p) for p in spec.exclude_patterns or ()]
        return cls(rules)

    def excluding_rule(self, rel: str, is_dir: bool) -> FilterRule | None:
        """The rule that excludes ``rel``, or None when it is sent."""
        for rule in self.rules:
            if rule.dirs_only and not is_dir:
                continue
            if rule.regex.fullmatch(rel):
                return None if rule.include else rule
        return None


def spec_filters(spec: TransferSpec) -> list[str]:
    value = getattr(spec, "filters", None)
    return list(value) if value else []


def parse_rule_text(text: str) -> tuple[bool, str]:
    """``"- glob"`` (exclude) or ``"+ glob"`` (include), as rsync and aspera.conf write them."""
    if len(text) < 3 or text[0] not in "+-" or text[1] != " ":
        raise UsageError(f"Filter rule {text!r} must be '- PATTERN' (exclude) or '+ PATTERN'")
    return text[0] == "+", text[2:]


# --- time windows ------------------------------------------------------------------------------


def time_threshold(value: int | str, now: float) -> float:
    """ascp's mtime argument: epoch seconds, negative = seconds before now, or ISO-8601."""
    if isinstance(value, int):
        return now + value if value < 0 else float(value)
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.astimezone()  # a naive time is local time, as the user wrote it
    return moment.timestamp()


@dataclass(frozen=True)
class TimeWindow:
    """Files (never folders) modified after ``newest`` or before ``oldest`` are left out."""

    newest: float | None = None
    oldest: float | None = None

    @classmethod
    def from_spec(cls, spec: TransferSpec, now: float | None = None) -> TimeWindow:
        now = time.time() if now is None else now
        newer, older = spec.exclude_newer_than, spec.exclude_older_than
        return cls(
            time_threshold(newer, now) if newer is not None else None,
            time_threshold(older, now) if older is not None else None,
        )

    def reason(self, mtime_ns: int) -> str | None:
        mtime = mtime_ns / 1e9
        if self.newest is not None and mtime > self.newest:
            return "modified after exclude_newer_than"
        if self.oldest is not None and mtime < self.oldest:
            return "modified before exclude_older_than"
        return None


# --- the selection ---------------------------------------------------------------------------


def select_sources(
    spec: TransferSpec, *, base_dir: Path, docroot: Path | None, now: float | None = None
) -> Iterator[SourceEntry | LeftOut]:
    """The spec's sources after the symlink policy, filter rules and time windows."""
    policy = spec.symlink_policy or "follow"
    pending: deque[LeftOut] = deque()
    root = os.path.realpath(docroot) if docroot is not None else None

    def on_skip(path: Path, reason: str) -> None:
        shown = "/" + os.path.relpath(path, root) if root is not None else str(path)
        pending.append(LeftOut(shown, reason, excluded=False))

    entries = expand_sources(
        [(p.source, p.destination) for p in spec.path_pairs()],
        base_dir=base_dir,
        docroot=docroot,
        source_root=spec.source_root,
        src_base=spec.src_base,
        follow_symlinks=policy == "follow",
        copy_links=policy in ("copy", "copy+force"),
        on_skip=on_skip,
    )
    return _filtered(entries, pending, FilterRules.from_spec(spec), TimeWindow.from_spec(spec, now))


def _filtered(
    entries: Iterator[SourceEntry],
    pending: deque[LeftOut],
    rules: FilterRules,
    window: TimeWindow,
) -> Iterator[SourceEntry | LeftOut]:
    pruned: str | None = None  # an excluded folder: everything below it is left out silently
    for entry in entries:
        while pending:
            yield pending.popleft()
        if pruned is not None and entry.rel_path.startswith(pruned):
            continue
        pruned = None
        rule = rules.excluding_rule(entry.rel_path, entry.kind == "dir") if rules else None
        if rule is not None:
            if entry.kind == "dir":
                pruned = entry.rel_path + "/"
            yield LeftOut(entry.rel_path, f"excluded by {rule.text}", excluded=True)
            continue
        why = window.reason(entry.mtime_ns) if entry.kind == "file" else None
        if why is not None:
            yield LeftOut(entry.rel_path, why, excluded=True)
            continue
        yield entry
    while pending:
        yield pending.popleft()


# --- scanning in a thread ---------------------------------------------------------------------


def _take(items: Iterator[T], count: int) -> tuple[list[T], BaseException | None]:
    batch: list[T] = []
    try:
        for _ in range(count):
            batch.append(next(items))
    except StopIteration:
        pass
    except Exception as exc:  # handed to the event loop, raised there in order
        return batch, exc
    return batch, None


async def iterate_in_thread(items: Iterator[T], batch: int = PREFETCH_BATCH) -> AsyncIterator[T]:
    """Advance a blocking iterator (folder walks, stats) in a worker thread, one batch ahead.

    While the caller announces one batch, the thread already scans the next one, so
    directory scanning overlaps with sending instead of stalling the event loop.
    """
    loop = asyncio.get_running_loop()
    upcoming = loop.run_in_executor(None, _take, items, batch)
    while True:
        chunk, error = await upcoming
        done = error is not None or len(chunk) < batch
        if not done:
            upcoming = loop.run_in_executor(None, _take, items, batch)
        for item in chunk:
            yield item
        if error is not None:
            raise error
        if done:
            return
