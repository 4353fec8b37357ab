"""Source disposition, save-before-overwrite names, mirror deletion and received links."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from slipstream.engine.disposition import MirrorTracker, SourceDisposer, backup_name
from slipstream.engine.incoming import check_link_target, place_link
from slipstream.engine.paths import SourceEntry
from slipstream.errors import DocrootViolation


def entry(path: Path, rel: str) -> SourceEntry:
    st = path.stat()
    kind = "dir" if path.is_dir() else "file"
    return SourceEntry(path, rel, kind, 0 if kind == "dir" else st.st_size, st.st_mtime_ns, 0o644)


def test_backup_names(tmp_path: Path) -> None:
    final = tmp_path / "report.final.pdf"
    final.write_text("v1")
    first = backup_name(final, now=0)
    assert re.fullmatch(r"report\.final\.\d{4}(\.\d\d){5}\.0\.pdf", first.name)
    first.write_text("taken")
    assert backup_name(final, now=0).name.endswith(".1.pdf")
    assert re.fullmatch(r"README\.[\d.]+\.0", backup_name(tmp_path / "README").name)


def test_remove_after_transfer_keeps_changed_sources(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    (tmp_path / "top" / "sub").mkdir(parents=True)
    a, b = tmp_path / "top" / "sub" / "a", tmp_path / "top" / "sub" / "b"
    a.write_text("a")
    b.write_text("b")
    disposer = SourceDisposer(remove=True, remove_empty_dirs=True)
    disposer.note_dir(entry(tmp_path / "top", "top"))
    disposer.note_dir(entry(tmp_path / "top" / "sub", "top/sub"))
    sent_a, sent_b = entry(a, "top/sub/a"), entry(b, "top/sub/b")
    b.write_text("changed after it was read")
    disposer.file_done(sent_a, events.append)
    disposer.file_done(sent_b, events.append)
    disposer.finish(events.append)
    assert not a.exists() and b.exists()
    assert [e["type"] for e in events] == ["source_removed", "source_kept"]
    b.unlink()
    disposer.finish(events.append)
    assert not (tmp_path / "top" / "sub").exists()
    assert (tmp_path / "top").is_dir()  # the source folder itself stays


def test_move_after_transfer(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    (tmp_path / "src").mkdir()
    source = tmp_path / "src" / "f.txt"
    source.write_text("data")
    disposer = SourceDisposer(archive=tmp_path / "archive")
    disposer.file_done(entry(source, "src/f.txt"), events.append)
    assert (tmp_path / "archive" / "src" / "f.txt").read_text() == "data"
    assert not source.exists()
    source.write_text("again")
    disposer.file_done(entry(source, "src/f.txt"), events.append)  # the archive has one
    assert source.exists() and events[-1]["type"] == "source_kept"


def test_mirror_deletes_only_what_the_source_lacks(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "d" / "gone-dir").mkdir(parents=True)
    for name in ("keep", "extra", "new.partial", "new.partial.slipstream-ckpt", "x.log"):
        (dest / "d" / name).write_text(name)
    (dest / "d" / "gone-dir" / "f").write_text("f")
    (dest / "d" / "saved").write_text("made by this session")
    (dest / "d" / "link").symlink_to("/etc")
    deleted: list[str] = []
    tracker = MirrorTracker(
        lambda rel: dest / rel,
        ".partial",
        lambda rel, is_dir: rel.endswith(".log"),
        lambda rel, path: deleted.append(rel),
    )
    tracker.created.add(dest / "d" / "saved")
    tracker.entry("d", True)
    tracker.entry("d/keep", False)
    tracker.entry("d/new", False)
    tracker.entry("other", True)  # leaving "d": its listing is complete
    assert sorted(deleted) == ["d/extra", "d/gone-dir", "d/link"]
    assert os.path.exists("/etc")  # a link is removed, never what it points to
    assert sorted(os.listdir(dest / "d")) == sorted(
        ["keep", "new.partial", "new.partial.slipstream-ckpt", "x.log", "saved"]
    )
    tracker.finish()


def test_received_links_stay_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "t.txt").write_text("t")
    (tmp_path / "secret").write_text("s")
    check_link_target(root / "a" / "l", "t.txt", root)
    check_link_target(root / "a" / "l", "../a/t.txt", root)
    for bad in ("/etc/passwd", "../../secret", "../a/../../secret", ""):
        with pytest.raises(DocrootViolation):
            check_link_target(root / "a" / "l", bad, root)
    (root / "a" / "out").symlink_to(tmp_path)  # an existing link that leads out
    with pytest.raises(DocrootViolation):
        check_link_target(root / "a" / "l", "out/secret", root)


def test_place_link_policies(tmp_path: Path) -> None:
    (tmp_path / "target").write_text("t")
    (tmp_path / "file").write_text("a regular file")
    assert place_link(tmp_path / "l", "target", tmp_path, "copy") == ""
    assert place_link(tmp_path / "l", "target", tmp_path, "copy") == "identical"
    assert place_link(tmp_path / "l", "file", tmp_path, "copy") == ""  # a link: replaced
    assert os.readlink(tmp_path / "l") == "file"
    assert place_link(tmp_path / "file", "target", tmp_path, "copy") == "exists"
    assert place_link(tmp_path / "file", "target", tmp_path, "copy+force") == ""
    assert os.readlink(tmp_path / "file") == "target"
