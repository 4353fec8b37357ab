"""ascp-style --file-list and --file-pair-list files."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slipstream.engine.filelists import (
    parse_file_list,
    parse_file_pair_list,
    read_file_list,
    read_file_pair_list,
)
from slipstream.engine.paths import expand_sources
from slipstream.errors import PathError, SourceNotFound, UsageError


def test_file_list_lines_blank_lines_and_trailing_newline() -> None:
    text = "a.txt\n\n  \nsub/b.txt\n/abs/c.txt\n"
    assert parse_file_list(text) == [("a.txt", None), ("sub/b.txt", None), ("/abs/c.txt", None)]


def test_crlf_bom_and_significant_spaces() -> None:
    text = "\ufeff a.txt\r\nb.txt \r\n\r\n"
    assert parse_file_list(text) == [(" a.txt", None), ("b.txt ", None)]


def test_only_newline_separates_lines() -> None:
    # \u2028, \x1c, \x85, \r alone may be part of a name; str.splitlines would cut there.
    names = ["a\u2028b", "c\x1cd", "e\x85f", "g\rh"]
    assert parse_file_list("\n".join(names)) == [(n, None) for n in names]


def test_pair_list() -> None:
    text = "src/a.txt\ndst/a.txt\n\nsrc/b.txt\n\n/dst/b.txt"
    assert parse_file_pair_list(text) == [("src/a.txt", "dst/a.txt"), ("src/b.txt", "/dst/b.txt")]


def test_pair_list_with_odd_lines_names_the_line() -> None:
    text = "a\nA\n\nb\nB\n\nlonely.txt\n"
    with pytest.raises(UsageError, match=r"line 7: source 'lonely.txt' has no destination"):
        parse_file_pair_list(text, name="pairs.txt")


def test_empty_lists_are_refused() -> None:
    for parse in (parse_file_list, parse_file_pair_list):
        with pytest.raises(UsageError, match="names no file"):
            parse("\n \n")


@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\n\r"), min_size=1)))
def test_file_list_round_trip(names: list[str]) -> None:
    names = [n for n in names if n.strip() and not n.startswith("\ufeff")]
    if not names:
        return
    assert parse_file_list("\n".join(names) + "\n") == [(n, None) for n in names]


def test_read_files(tmp_path: Path) -> None:
    lst = tmp_path / "list.txt"
    lst.write_text("été/ü.txt\n日本.txt\n", encoding="utf-8")
    assert read_file_list(lst) == [("été/ü.txt", None), ("日本.txt", None)]
    pairs = tmp_path / "pairs.txt"
    pairs.write_bytes(b"a\r\nb\r\n")
    assert read_file_pair_list(str(pairs)) == [("a", "b")]


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"ok.txt\n\nbad-\xe9.txt\n")
    with pytest.raises(UsageError, match=r"list.txt: line 3 is not valid UTF-8"):
        read_file_list(lst)


def test_unreadable_list_files(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFound, match="nope.txt"):
        read_file_list(tmp_path / "nope.txt")
    with pytest.raises(PathError):
        read_file_pair_list(tmp_path)  # a folder


def test_pair_list_feeds_expand_sources(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "in").mkdir(parents=True)
    (root / "in" / "a.txt").write_text("a")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("in/a.txt\n/out/renamed.txt\n")
    entries = list(expand_sources(read_file_pair_list(pairs), base_dir=root, docroot=root))
    assert [(e.rel_path, e.local_path.name) for e in entries] == [("out/renamed.txt", "a.txt")]
