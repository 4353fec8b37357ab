"""Source selection: -E/-N rules, time windows, the symlink policy, scanning in a thread."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from slipstream.engine.paths import SourceEntry
from slipstream.engine.selection import (
    FilterRules,
    LeftOut,
    TimeWindow,
    compile_rule,
    iterate_in_thread,
    select_sources,
    time_threshold,
)
from slipstream.errors import UsageError
from slipstream.spec import load_transfer_spec


def rules(*texts: str) -> FilterRules:
    return FilterRules([compile_rule(t[0] == "+", t[2:]) for t in texts])


@pytest.mark.parametrize(
    ("pattern", "path", "is_dir", "matches"),
    [
        ("*.txt", "a.txt", False, True),
        ("*.txt", "deep/er/a.txt", False, True),  # no slash: the name, at any depth
        ("*.txt", "a.txt/b", False, False),
        ("/*.txt", "a.txt", False, True),  # anchored at the top
        ("/*.txt", "d/a.txt", False, False),
        ("sub/*.log", "top/sub/x.log", False, True),  # a slash: a path suffix
        ("sub/*.log", "top/xsub/x.log", False, False),
        ("/top/**/b", "top/b", False, True),
        ("/top/**/b", "top/x/y/b", False, True),
        ("/top/**", "top/x/y", False, True),
        ("f?.c", "f1.c", False, True),
        ("f?.c", "f12.c", False, False),
        ("[ab]*", "b1", False, True),
        ("[!ab]*", "b1", False, False),
        (r"\*", "*", False, True),
        (r"\*", "x", False, False),
        ("build/", "src/build", True, True),  # trailing slash: folders only
        ("build/", "src/build", False, False),
        ("/**/", "any/where", True, True),
    ],
)
def test_glob_semantics(pattern: str, path: str, is_dir: bool, matches: bool) -> None:
    found = rules(f"- {pattern}").excluding_rule(path, is_dir)
    assert (found is not None) == matches


def test_first_match_wins() -> None:
    only_text = rules("+ /**/", "+ *.txt", "- /**")
    assert only_text.excluding_rule("d/e", True) is None
    assert only_text.excluding_rule("d/e/a.txt", False) is None
    assert only_text.excluding_rule("d/e/a.bin", False) is not None
    reversed_order = rules("- /**", "+ *.txt")
    assert reversed_order.excluding_rule("a.txt", False) is not None
    assert rules().excluding_rule("anything", False) is None


def test_spec_rule_order_and_bad_rules() -> None:
    spec = load_transfer_spec(
        {
            "direction": "send",
            "paths": [{"source": "x"}],
            "filters": ["- *.log", "+ keep.log"],
            "include_patterns": ["*.tmp"],
            "exclude_patterns": ["*"],
        }
    )
    compiled = FilterRules.from_spec(spec)
    assert [r.text for r in compiled.rules] == ["-E *.log", "-N keep.log", "-N *.tmp", "-E *"]
    assert compiled.excluding_rule("keep.log", False) is not None  # "- *.log" comes first
    assert compiled.excluding_rule("a.tmp", False) is None
    with pytest.raises(UsageError):
        compile_rule(False, "[z-a]")  # a reversed range: refused before anything is sent


def test_time_thresholds() -> None:
    now = 1_800_000_000.0
    assert time_threshold(-60, now) == now - 60
    assert time_threshold(1_700_000_000, now) == 1_700_000_000
    assert time_threshold("2020-01-02T03:04:05+00:00", now) == 1577934245
    window = TimeWindow(newest=now - 60, oldest=now - 3600)
    assert window.reason(int((now - 30) * 1e9)) == "modified after exclude_newer_than"
    assert window.reason(int((now - 7200) * 1e9)) == "modified before exclude_older_than"
    assert window.reason(int((now - 600) * 1e9)) is None


def _tree(root: Path) -> Path:
    (root / "src" / "keep" / "deep").mkdir(parents=True)
    (root / "src" / "skipdir").mkdir()
    (root / "src" / "keep" / "a.txt").write_text("a")
    (root / "src" / "keep" / "deep" / "b.txt").write_text("b")
    (root / "src" / "keep" / "c.tmp").write_text("c")
    (root / "src" / "skipdir" / "d.txt").write_text("d")
    old = root / "src" / "old.txt"
    old.write_text("old")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    (root / "outside.txt").write_text("outside")
    (root / "src" / "inner-link").symlink_to("keep/a.txt")
    (root / "src" / "escape-link").symlink_to("../outside.txt")
    return root / "src"


def _select(root: Path, docroot: Path | None = None, **fields: object) -> list[object]:
    spec = load_transfer_spec({"direction": "send", "paths": [{"source": "src"}], **fields})
    return list(select_sources(spec, base_dir=root, docroot=docroot))


def _sent(items: list[object]) -> dict[str, str]:
    return {i.rel_path: i.kind for i in items if isinstance(i, SourceEntry)}


def test_filters_prune_folders_and_report(tmp_path: Path) -> None:
    _tree(tmp_path)
    items = _select(tmp_path, filters=["- skipdir/", "- *.tmp"], exclude_older_than=-3600)
    sent = _sent(items)
    assert "src/skipdir" not in sent and "src/skipdir/d.txt" not in sent
    assert "src/keep/c.tmp" not in sent and "src/old.txt" not in sent
    assert "src/keep/deep/b.txt" in sent
    notes = {i.path: i.reason for i in items if isinstance(i, LeftOut)}
    assert notes["src/skipdir"] == "excluded by -E skipdir/"
    assert notes["src/old.txt"] == "modified before exclude_older_than"
    assert all(i.excluded for i in items if isinstance(i, LeftOut))


def test_symlink_policies(tmp_path: Path) -> None:
    _tree(tmp_path)
    follow = _sent(_select(tmp_path))
    assert follow["src/inner-link"] == "file" and follow["src/escape-link"] == "file"
    skipped = _select(tmp_path, symlink_policy="skip")
    assert "src/inner-link" not in _sent(skipped)
    assert sum(isinstance(i, LeftOut) and not i.excluded for i in skipped) == 2
    copied = [i for i in _select(tmp_path, symlink_policy="copy") if isinstance(i, SourceEntry)]
    links = {i.rel_path: i.link_target for i in copied if i.kind == "link"}
    assert links == {"src/inner-link": "keep/a.txt", "src/escape-link": "../outside.txt"}


def test_links_out_of_a_docroot_are_never_sent(tmp_path: Path) -> None:
    _tree(tmp_path)
    docroot = tmp_path / "src"
    spec = load_transfer_spec(
        {"direction": "receive", "paths": [{"source": "/keep"}], "symlink_policy": "copy"}
    )
    (docroot / "keep" / "out").symlink_to("../../outside.txt")
    (docroot / "keep" / "in").symlink_to("a.txt")
    items = list(select_sources(spec, base_dir=docroot, docroot=docroot))
    links = [i.rel_path for i in items if isinstance(i, SourceEntry) and i.kind == "link"]
    assert links == ["keep/in"]
    notes = [i for i in items if isinstance(i, LeftOut)]
    assert notes[0].path == "/keep/out" and "outside the docroot" in notes[0].reason


def test_iterate_in_thread_keeps_order_and_raises_in_place() -> None:
    def numbers():  # type: ignore[no-untyped-def]
        yield from range(1000)
        raise UsageError("boom")

    async def collect() -> tuple[list[int], str]:
        seen: list[int] = []
        try:
            async for item in iterate_in_thread(numbers(), batch=64):
                seen.append(item)
        except UsageError as exc:
            return seen, exc.user_message
        return seen, ""

    seen, error = asyncio.run(collect())
    assert seen == list(range(1000)) and error == "boom"
