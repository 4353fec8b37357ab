"""The path model: docroot confinement, source expansion, destination resolution."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slipstream.engine import paths
from slipstream.engine.paths import (
    DestinationResolver,
    SourceEntry,
    expand_sources,
    resolve_in_docroot,
    safe_relative,
)
from slipstream.errors import (
    DocrootViolation,
    PathError,
    PermissionDenied,
    SourceNotFound,
    UsageError,
)


def make_tree(base: Path, spec: dict[str, str | None]) -> None:
    """Create files (str content) and folders (None); a name ending in "/" is a folder."""
    for rel, content in spec.items():
        path = base / rel
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)


def rels(entries: Iterator[SourceEntry] | list[SourceEntry]) -> list[tuple[str, str]]:
    return [(e.rel_path, e.kind) for e in entries]


def is_inside(root: Path, path: Path | str) -> bool:
    root_s, path_s = str(root), str(path)
    return path_s == root_s or path_s.startswith(root_s + "/")


# --- a docroot full of traps, shared by the property tests -----------------------------

ESCAPING = {"out_rel", "out_abs", "out_file", "chain1", "dangling_out", "updir", "deep_out"}
LOOPS = {"loop", "loopa", "loopb"}


@pytest.fixture(scope="module")
def trap_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("trap").resolve()
    make_tree(
        base,
        {
            "outside/secret.txt": "secret",
            "outside/dir": None,
            "root/a/f.txt": "f",
            "root/a/b": None,
            "root/é/ü.txt": "u",
            "root/back\\slash": "b",
        },
    )
    root = base / "root"
    links = {
        "in_dir": "a",
        "in_abs": str(root / "a" / "b"),
        "self": ".",
        "out_rel": "../outside",
        "out_abs": str(base / "outside"),
        "out_file": "../outside/secret.txt",
        "chain1": "chain2",
        "chain2": "../outside",
        "chainok1": "chainok2",
        "chainok2": "a/b",
        "loop": "loop",
        "loopa": "loopb",
        "loopb": "loopa",
        "dangling_in": "a/new_target",
        "dangling_out": "../outside/nope",
        "updir": "..",
        "deep_out": "a/../../outside/dir",
    }
    for name, target in links.items():
        os.symlink(target, root / name)
    return root


COMPONENTS = st.sampled_from(
    [
        "..",
        ".",
        "",
        "a",
        "b",
        "f.txt",
        "é",
        "ü.txt",
        "back\\slash",
        "new",
        "dir",
        "secret.txt",
        "x\x00y",
        *sorted(ESCAPING),
        *sorted(LOOPS),
        "in_dir",
        "in_abs",
        "self",
        "chainok1",
        "dangling_in",
    ]
) | st.text(alphabet=st.characters(blacklist_characters="/\x00"), min_size=1, max_size=8)


@st.composite
def user_paths(draw: st.DrawFn) -> str:
    parts = draw(st.lists(COMPONENTS, max_size=7))
    lead = draw(st.sampled_from(["", "/", "//"]))
    trail = draw(st.sampled_from(["", "/"]))
    return lead + "/".join(parts) + trail


def lexical(user_path: str) -> list[str] | None:
    """The oracle's normalisation: None when ``..`` climbs above the root."""
    out: list[str] = []
    for comp in user_path.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not out:
                return None
            out.pop()
        else:
            out.append(comp)
    return out


@settings(max_examples=600, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user_path=user_paths(), must_exist=st.booleans())
def test_resolve_is_inside_or_refused(trap_root: Path, user_path: str, must_exist: bool) -> None:
    try:
        result = resolve_in_docroot(trap_root, user_path, must_exist=must_exist)
    except PathError:  # DocrootViolation, SourceNotFound, PermissionDenied are all PathErrors
        return
    assert result.is_absolute()
    assert is_inside(trap_root, result)
    # Even re-resolved by the OS, what exists of it stays inside: no link left to escape by.
    assert is_inside(trap_root, os.path.realpath(result))
    assert "\x00" not in user_path
    if must_exist:
        assert result.exists()


ROOT_LINKS = {
    "in_dir": ["a"],
    "in_abs": ["a", "b"],
    "chainok1": ["a", "b"],
    "dangling_in": ["a", "new_target"],
}
FILES = [["a", "f.txt"], ["é", "ü.txt"], ["back\\slash"]]


def oracle(user_path: str) -> str | list[str]:
    """What the trap docroot must make of a path: "violation", "error" (a loop, a file used
    as a folder) or the components of the real result below the root."""
    if "\x00" in user_path:
        return "violation"
    if any(0xD800 <= ord(c) <= 0xDFFF and not 0xDC80 <= ord(c) <= 0xDCFF for c in user_path):
        return "error"  # a lone surrogate: no byte string decodes to it
    parts = lexical(user_path)
    if parts is None:
        return "violation"
    loc: list[str] = []
    for part in parts:
        if loc in FILES:
            return "error"
        if not loc and part in ESCAPING:
            return "violation"
        if not loc and part in LOOPS:
            return "error"
        if not loc and part in ROOT_LINKS:
            loc = list(ROOT_LINKS[part])
        elif loc or part != "self":
            loc.append(part)
    return loc


@settings(max_examples=600, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user_path=user_paths())
def test_resolve_matches_the_oracle(trap_root: Path, user_path: str) -> None:
    expected = oracle(user_path)
    if expected == "violation":
        with pytest.raises(DocrootViolation):
            resolve_in_docroot(trap_root, user_path)
    elif expected == "error":
        with pytest.raises(PathError) as info:
            resolve_in_docroot(trap_root, user_path)
        assert not isinstance(info.value, DocrootViolation)
    else:
        assert resolve_in_docroot(trap_root, user_path) == trap_root.joinpath(*expected)


@pytest.mark.parametrize(
    ("user_path", "expected"),
    [
        ("", "."),
        ("/", "."),
        (".", "."),
        ("//a//b/", "a/b"),
        ("/a/b/../f.txt", "a/f.txt"),
        ("a/./b/./new/file", "a/b/new/file"),
        ("in_dir/f.txt", "a/f.txt"),
        ("in_abs/new", "a/b/new"),
        ("chainok1/x", "a/b/x"),
        ("self/a", "a"),
        ("in_dir/..", "."),  # ".." is applied to the text: the folder holding the link
        ("dangling_in", "a/new_target"),
        ("back\\slash", "back\\slash"),
        ("é/ü.txt", "é/ü.txt"),
    ],
)
def test_resolve_examples(trap_root: Path, user_path: str, expected: str) -> None:
    assert resolve_in_docroot(trap_root, user_path) == (trap_root / expected).resolve()


@pytest.mark.parametrize(
    "user_path",
    [
        "..",
        "/..",
        "a/../..",
        "../root/a",
        "a/b/../../../x",
        "out_rel",
        "out_rel/secret.txt",
        "out_abs/new",
        "/out_file",
        "chain1/x",
        "dangling_out",
        "updir",
        "updir/root/a",
        "deep_out",
        "in_dir/\x00",
        "\x00",
    ],
)
def test_resolve_violations(trap_root: Path, user_path: str) -> None:
    with pytest.raises(DocrootViolation) as info:
        resolve_in_docroot(trap_root, user_path)
    assert not info.value.retryable
    assert repr(user_path) in info.value.user_message
    # The server's own layout never appears in what is sent back to the peer.
    assert str(trap_root.parent) not in info.value.user_message


@pytest.mark.parametrize("user_path", ["loop", "loopa/x", "a/f.txt/x"])
def test_resolve_loops_and_files_as_folders(trap_root: Path, user_path: str) -> None:
    with pytest.raises(PathError) as info:
        resolve_in_docroot(trap_root, user_path)
    assert not isinstance(info.value, DocrootViolation)


def test_resolve_must_exist_and_allow_root(trap_root: Path) -> None:
    with pytest.raises(SourceNotFound, match="nothing/here"):
        resolve_in_docroot(trap_root, "a/nothing/here", must_exist=True)
    with pytest.raises(SourceNotFound):
        resolve_in_docroot(trap_root, "dangling_in", must_exist=True)
    assert resolve_in_docroot(trap_root, "a/f.txt", must_exist=True).is_file()
    with pytest.raises(DocrootViolation, match="docroot itself"):
        resolve_in_docroot(trap_root, "/", allow_root=False)
    with pytest.raises(DocrootViolation):
        resolve_in_docroot(trap_root, "self", allow_root=False)


def test_resolve_through_a_symlinked_docroot(tmp_path: Path) -> None:
    make_tree(tmp_path, {"real/a.txt": "x", "other/b.txt": "y"})
    os.symlink("real", tmp_path / "root")
    os.symlink("../other", tmp_path / "real" / "out")
    assert resolve_in_docroot(tmp_path / "root", "a.txt") == tmp_path.resolve() / "real/a.txt"
    with pytest.raises(DocrootViolation):
        resolve_in_docroot(tmp_path / "root", "out/b.txt")


def test_names_that_are_not_bytes(trap_root: Path) -> None:
    # "\udce9" is how os.fsdecode spells the byte 0xE9; "\ud800" stands for no byte at all.
    assert resolve_in_docroot(trap_root, "caf\udce9") == trap_root / "caf\udce9"
    assert safe_relative("caf\udce9") == "caf\udce9"
    with pytest.raises(PathError, match="not a valid file name"):
        resolve_in_docroot(trap_root, "a/\ud800")
    with pytest.raises(PathError, match="not a valid file name"):
        safe_relative("\ud800")


def test_resolve_missing_docroot(tmp_path: Path) -> None:
    with pytest.raises(PathError, match="docroot"):
        resolve_in_docroot(tmp_path / "nope", "a")


# --- safe_relative ---------------------------------------------------------------------


@given(st.lists(COMPONENTS, max_size=6).map("/".join) | st.text(max_size=20))
def test_safe_relative_never_escapes(rel: str) -> None:
    try:
        out = safe_relative(rel)
    except PathError:  # DocrootViolation, or a name no file system can hold
        return
    parts = out.split("/")
    assert not out.startswith("/")
    assert "\x00" not in out
    assert not {"", ".", ".."} & set(parts)
    assert posixpath.normpath(out) == out
    assert posixpath.normpath(posixpath.join("/base", out)).startswith("/base/")
    assert safe_relative(out) == out


@pytest.mark.parametrize(
    ("rel", "expected"),
    [("a", "a"), ("a/b", "a/b"), ("./a/./b", "a/b"), ("a\\..\\b", "a\\..\\b"), ("é", "é")],
)
def test_safe_relative_accepts(rel: str, expected: str) -> None:
    assert safe_relative(rel) == expected


@pytest.mark.parametrize(
    "rel", ["", ".", "./.", "/a", "a/../b", "..", "a/..", "a//b", "a/", "a\x00b", "//a"]
)
def test_safe_relative_refuses(rel: str) -> None:
    with pytest.raises(DocrootViolation):
        safe_relative(rel)


# --- expand_sources: plain lists -------------------------------------------------------


@pytest.fixture
def docroot(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    make_tree(
        root,
        {
            "top.txt": "top",
            "d/b.txt": "bb",
            "d/a.txt": "a",
            "d/sub/z.txt": "zzz",
            "d/sub/empty": None,
            "d/c": None,
        },
    )
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("secret")
    return root


def expand(root: Path, *sources: str, **kwargs: object) -> list[SourceEntry]:
    pairs: list[tuple[str, str | None]] = [(s, None) for s in sources]
    kwargs.setdefault("base_dir", root)
    kwargs.setdefault("docroot", root)
    return list(expand_sources(pairs, **kwargs))  # type: ignore[arg-type]


def test_plain_file_uses_basename(docroot: Path) -> None:
    [entry] = expand(docroot, "/d/sub/z.txt")
    assert entry == SourceEntry(
        local_path=docroot.resolve() / "d/sub/z.txt",
        rel_path="z.txt",
        kind="file",
        size=3,
        mtime_ns=(docroot / "d/sub/z.txt").stat().st_mtime_ns,
        mode=(docroot / "d/sub/z.txt").stat().st_mode & 0o7777,
    )


def test_plain_dir_is_recursive_sorted_with_empty_dirs(docroot: Path) -> None:
    assert rels(expand(docroot, "d", "top.txt")) == [
        ("d", "dir"),
        ("d/a.txt", "file"),
        ("d/b.txt", "file"),
        ("d/c", "dir"),
        ("d/sub", "dir"),
        ("d/sub/empty", "dir"),
        ("d/sub/z.txt", "file"),
        ("top.txt", "file"),
    ]


def test_dirs_have_no_size_and_trailing_slash_is_ignored(docroot: Path) -> None:
    entries = expand(docroot, "d/")
    assert entries[0].rel_path == "d"
    assert all(e.size == 0 for e in entries if e.kind == "dir")


def test_source_root_is_prepended(docroot: Path) -> None:
    assert rels(expand(docroot, "sub", "/a.txt", source_root="/d")) == [
        ("sub", "dir"),
        ("sub/empty", "dir"),
        ("sub/z.txt", "file"),
        ("a.txt", "file"),
    ]
    with pytest.raises(DocrootViolation):
        expand(docroot, "../../x", source_root="d")


def test_relative_sources_follow_base_dir_inside_the_docroot(docroot: Path, tmp_path: Path) -> None:
    assert rels(expand(docroot, "z.txt", "../a.txt", base_dir=docroot / "d/sub")) == [
        ("z.txt", "file"),
        ("a.txt", "file"),
    ]
    assert rels(expand(docroot, "/top.txt", base_dir=docroot / "d")) == [("top.txt", "file")]
    with pytest.raises(DocrootViolation):
        expand(docroot, "x", base_dir=tmp_path / "outside")


def test_missing_source(docroot: Path) -> None:
    with pytest.raises(SourceNotFound, match="nope.txt"):
        expand(docroot, "d/nope.txt")
    with pytest.raises(SourceNotFound, match="nope.txt"):
        expand(docroot, "d/nope.txt", docroot=None)


def test_sources_escaping_the_docroot(docroot: Path) -> None:
    for source in ["..", "../outside/secret.txt", "d/../../outside"]:
        with pytest.raises(DocrootViolation):
            expand(docroot, source)


def test_root_itself_needs_src_base(docroot: Path) -> None:
    with pytest.raises(UsageError, match="root folder"):
        expand(docroot, "/")
    assert ("top.txt", "file") in rels(expand(docroot, "/", src_base="/"))


def test_usage_errors_are_raised_by_the_call(docroot: Path) -> None:
    common = {"base_dir": docroot, "docroot": docroot}
    with pytest.raises(UsageError):
        expand_sources([], **common)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="pair list"):
        expand_sources([("a", "x"), ("b", None)], **common)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="src_base"):
        expand_sources([("a", "x")], src_base="/", **common)  # type: ignore[arg-type]
    with pytest.raises(DocrootViolation):
        expand_sources([("a", "../x")], **common)  # type: ignore[arg-type]


def test_local_mode_without_docroot(tmp_path: Path, docroot: Path) -> None:
    outside = tmp_path / "outside"
    os.symlink(outside, docroot / "d" / "ext")
    entries = expand(docroot, "d", docroot=None)
    assert ("d/ext/secret.txt", "file") in rels(entries)  # the user's own links are followed
    assert rels(expand(docroot, ".", docroot=None, base_dir=docroot / "d/sub")) == [
        ("sub", "dir"),
        ("sub/empty", "dir"),
        ("sub/z.txt", "file"),
    ]
    absolute = str(docroot / "top.txt")
    assert rels(expand(docroot, absolute, docroot=None, base_dir=tmp_path)) == [("top.txt", "file")]
    with pytest.raises(UsageError):
        expand(docroot, "/", docroot=None)
    with pytest.raises(PathError):
        expand(docroot, "a\x00", docroot=None)


def test_local_mode_source_root(tmp_path: Path, docroot: Path) -> None:
    entries = expand(
        docroot, "d/sub/z.txt", docroot=None, base_dir=tmp_path, source_root=str(docroot)
    )
    assert rels(entries) == [("z.txt", "file")]


# --- expand_sources: symbolic links ----------------------------------------------------


class Skips:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def __call__(self, path: Path, reason: str) -> None:
        self.items.append((path.name, reason))


def test_links_inside_are_followed_and_named_after_the_link(docroot: Path) -> None:
    os.symlink("d", docroot / "latest")
    os.symlink("../top.txt", docroot / "d" / "top-link")
    os.symlink(str(docroot / "d" / "sub"), docroot / "d" / "abs-sub")
    entries = {e.rel_path: e for e in expand(docroot, "latest")}
    assert entries["latest"].local_path == docroot.resolve() / "d"
    assert entries["latest/top-link"].local_path == docroot.resolve() / "top.txt"
    assert entries["latest/top-link"].kind == "file"
    assert entries["latest/abs-sub/z.txt"].local_path == docroot.resolve() / "d/sub/z.txt"


def test_nested_links_out_of_the_docroot_are_skipped(docroot: Path, tmp_path: Path) -> None:
    os.symlink("../../outside", docroot / "d" / "out-dir")
    os.symlink(str(tmp_path / "outside" / "secret.txt"), docroot / "d" / "out-file")
    os.symlink("chain2", docroot / "d" / "chain1")
    os.symlink("../../outside", docroot / "d" / "chain2")
    os.symlink("nowhere", docroot / "d" / "broken")
    skips = Skips()
    names = {e.rel_path for e in expand(docroot, "d", on_skip=skips)}
    assert not any("out" in n or "chain" in n or "broken" in n for n in names)
    assert sorted(skips.items) == [
        ("broken", "broken symbolic link"),
        ("chain1", "symbolic link leads outside the docroot"),
        ("chain2", "symbolic link leads outside the docroot"),
        ("out-dir", "symbolic link leads outside the docroot"),
        ("out-file", "symbolic link leads outside the docroot"),
    ]


def test_top_level_link_out_of_the_docroot_is_refused(docroot: Path) -> None:
    os.symlink("../outside", docroot / "out")
    with pytest.raises(DocrootViolation, match="out"):
        expand(docroot, "out")
    with pytest.raises(DocrootViolation):
        expand(docroot, "out/secret.txt")


def test_directory_link_loops_are_detected(docroot: Path) -> None:
    os.symlink("..", docroot / "d" / "sub" / "up")  # back to an ancestor
    os.symlink(".", docroot / "d" / "here")  # the folder itself
    os.symlink("spin", docroot / "d" / "spin")  # a link to itself
    os.symlink(str(docroot / "d" / "c"), docroot / "d" / "sub" / "to-c")  # not a loop
    skips = Skips()
    got = rels(expand(docroot, "d", on_skip=skips))
    assert ("d/sub/to-c", "dir") in got
    assert not any("/up" in r or "/here" in r or "spin" in r for r, _ in got)
    reasons = dict(skips.items)
    assert reasons["up"].startswith("symbolic link loop")
    assert reasons["here"].startswith("symbolic link loop")
    assert reasons["spin"] == "symbolic link loop"


def test_mutual_directory_links_terminate(docroot: Path) -> None:
    os.symlink("../c", docroot / "d" / "sub" / "to-c")
    os.symlink("../sub", docroot / "d" / "c" / "to-sub")
    got = rels(expand(docroot, "d", on_skip=lambda p, r: None))
    assert ("d/c/to-sub/to-c", "dir") not in got  # c -> sub -> c would be a loop
    assert ("d/c/to-sub", "dir") in got
    assert ("d/sub/to-c/to-sub", "dir") not in got


def test_not_following_links(docroot: Path) -> None:
    os.symlink("sub", docroot / "d" / "link")
    os.symlink("d", docroot / "top-link")
    skips = Skips()
    got = rels(expand(docroot, "d", "top-link", follow_symlinks=False, on_skip=skips))
    assert not any("link" in r for r, _ in got)
    assert [name for name, _ in skips.items] == ["link", "top-link"]
    got_local = rels(
        expand(docroot, "top-link", docroot=None, follow_symlinks=False, on_skip=skips)
    )
    assert got_local == []


def test_special_files_are_skipped(docroot: Path) -> None:
    os.mkfifo(docroot / "d" / "fifo")
    skips = Skips()
    assert "d/fifo" not in {r for r, _ in rels(expand(docroot, "d", on_skip=skips))}
    assert skips.items == [("fifo", "not a regular file or a folder")]
    with pytest.raises(PathError, match="not a regular file"):
        expand(docroot, "d/fifo")


def test_skips_are_logged_without_a_callback(
    docroot: Path, caplog: pytest.LogCaptureFixture
) -> None:
    os.symlink("nowhere", docroot / "d" / "broken")
    expand(docroot, "d")
    assert "broken symbolic link" in caplog.text


# --- expand_sources: permissions (simulated: the tests may run as root) ----------------


def test_unreadable_source_folder(docroot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_scandir = os.scandir
    denied = str(docroot.resolve() / "d" / "sub")

    def scandir(path: os.PathLike[str]) -> object:
        if os.fspath(path) == denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(paths.os, "scandir", scandir)
    with pytest.raises(PermissionDenied, match="d/sub"):
        expand(docroot, "d/sub")
    skips = Skips()
    got = rels(expand(docroot, "d", on_skip=skips))
    assert ("d/sub", "dir") not in got and ("d/sub/z.txt", "file") not in got
    assert skips.items == [("sub", "cannot list folder: Permission denied")]


def test_unreadable_source_file(docroot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionDenied, match="top.txt"):
        expand(docroot, "top.txt")


# --- expand_sources: pairs and src_base ------------------------------------------------


def test_pair_list(docroot: Path) -> None:
    entries = list(
        expand_sources(
            [("top.txt", "/renamed/t.txt"), ("d/a.txt", "x.txt")],
            base_dir=docroot,
            docroot=docroot,
        )
    )
    assert [(e.rel_path, e.local_path.name) for e in entries] == [
        ("renamed/t.txt", "top.txt"),
        ("x.txt", "a.txt"),
    ]
    with pytest.raises(UsageError, match="'d' is a folder"):
        list(expand_sources([("d", "x")], base_dir=docroot, docroot=docroot))
    for bad in ["", "/", "a//b", "a/../../b"]:
        with pytest.raises((UsageError, DocrootViolation)):
            expand_sources([("top.txt", bad)], base_dir=docroot, docroot=docroot)


def test_src_base_keeps_the_rest_of_the_path(docroot: Path) -> None:
    assert rels(expand(docroot, "/d/sub", "/d/a.txt", src_base="/d")) == [
        ("sub", "dir"),
        ("sub/empty", "dir"),
        ("sub/z.txt", "file"),
        ("a.txt", "file"),
    ]
    assert rels(expand(docroot, "/d/sub/z.txt", src_base="/")) == [("d/sub/z.txt", "file")]


def test_src_base_equal_to_the_source_sends_its_contents(docroot: Path) -> None:
    # ascp --src-base=/src/data/ /src/data/ : the contents, not the folder itself.
    assert rels(expand(docroot, "d/sub/", src_base="d/sub")) == [
        ("empty", "dir"),
        ("z.txt", "file"),
    ]
    with pytest.raises(UsageError, match="src_base itself"):
        expand(docroot, "top.txt", src_base="top.txt")


def test_src_base_mismatch(docroot: Path) -> None:
    with pytest.raises(UsageError, match="not below src_base"):
        expand(docroot, "top.txt", src_base="/d")
    with pytest.raises(UsageError, match="not below src_base"):
        expand(docroot, "/dd/x", src_base="/d")  # a string prefix is not a folder prefix


def test_src_base_local_and_with_source_root(docroot: Path, tmp_path: Path) -> None:
    got = rels(
        expand(docroot, str(docroot / "d/sub/z.txt"), docroot=None, src_base=str(docroot / "d"))
    )
    assert got == [("sub/z.txt", "file")]
    got = rels(expand(docroot, "sub/z.txt", source_root="/d", src_base="sub"))
    assert got == [("z.txt", "file")]


# --- expand_sources: names and streaming -----------------------------------------------


def test_unicode_and_undecodable_names_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tree(root, {"été/日本語.txt": "x", "été/e\u0301.txt": "y"})
    raw = os.fsencode(root / "été") + b"/caf\xe9.bin"
    with open(raw, "wb") as f:
        f.write(b"z")
    entries = expand(root, "été")
    by_rel = {e.rel_path: e for e in entries}
    assert "été/日本語.txt" in by_rel and "été/e\u0301.txt" in by_rel
    odd = [e for e in entries if e.rel_path.endswith(".bin")]
    assert [os.fsencode(e.rel_path) for e in odd] == [os.fsencode("été") + b"/caf\xe9.bin"]
    assert odd[0].local_path.read_bytes() == b"z"


def test_deep_trees_do_not_recurse(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    folders = [root]
    fd = os.open(root, os.O_RDONLY)
    for _ in range(1100):  # past the interpreter's recursion limit, within PATH_MAX
        # Relative to an open folder: creating by full path costs O(depth) per level.
        os.mkdir("x", dir_fd=fd)
        fd, old = os.open("x", os.O_RDONLY, dir_fd=fd), fd
        os.close(old)
        folders.append(folders[-1] / "x")
    os.close(fd)
    try:
        entries = expand(root, "x")
        assert len(entries) == 1100
        assert entries[-1].rel_path == "/".join(["x"] * 1100)
    finally:
        for folder in reversed(folders[1:]):  # shutil.rmtree itself recurses too deep
            folder.rmdir()


def test_streaming_lists_folders_only_when_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    for d in range(40):  # the count does not matter, only what is listed when; keep it quick
        folder = root / "big" / f"d{d:03}"
        folder.mkdir(parents=True)
        for f in range(50):
            (folder / f"f{f:03}").write_bytes(b"")
    real_scandir = os.scandir
    listed: list[str] = []

    def scandir(path: os.PathLike[str]) -> object:
        listed.append(os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(paths.os, "scandir", scandir)
    stream = expand_sources([("big", None)], base_dir=root, docroot=root)
    assert listed == []  # nothing is read before the stream is consumed
    first = [next(stream) for _ in range(3)]
    assert [e.rel_path for e in first] == ["big", "big/d000", "big/d000/f000"]
    assert len(listed) == 2  # "big" and "big/d000" only, of 41 folders
    assert sum(1 for _ in stream) == 1 + 40 + 40 * 50 - 3


def test_streaming_sees_files_added_during_the_walk(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tree(root, {"t/a/1.txt": "1", "t/b": None})
    stream = expand_sources([("t", None)], base_dir=root, docroot=root)
    assert next(stream).rel_path == "t"
    (root / "t" / "b" / "late.txt").write_text("late")
    assert [e.rel_path for e in stream] == ["t/a", "t/a/1.txt", "t/b", "t/b/late.txt"]


# --- DestinationResolver: the rename rule matrix ---------------------------------------

DEST_STATES = ["existing-dir", "absent-with-parent", "absent-without-parent"]


def _dest_for(root: Path, state: str) -> str:
    (root / "parent").mkdir(exist_ok=True)
    (root / "parent" / "existing").mkdir(exist_ok=True)
    return {
        "existing-dir": "/parent/existing",
        "absent-with-parent": "/parent/new",
        "absent-without-parent": "/missing/new",
    }[state]


# (source kind, destination state, create_dir) -> folder | rename | error
RULE = {
    ("file", "existing-dir", False): "folder",
    ("file", "existing-dir", True): "folder",
    ("file", "absent-with-parent", False): "rename",
    ("file", "absent-with-parent", True): "folder",
    ("file", "absent-without-parent", False): "error",
    ("file", "absent-without-parent", True): "folder",
    ("dir", "existing-dir", False): "folder",
    ("dir", "existing-dir", True): "folder",
    ("dir", "absent-with-parent", False): "rename",
    ("dir", "absent-with-parent", True): "folder",
    ("dir", "absent-without-parent", False): "error",
    ("dir", "absent-without-parent", True): "folder",
}


@pytest.mark.parametrize(("kind", "state", "create_dir"), sorted(RULE))
def test_rename_rule_matrix(tmp_path: Path, kind: str, state: str, create_dir: bool) -> None:
    root = tmp_path / "root"
    root.mkdir()
    dest = _dest_for(root, state)
    resolver = DestinationResolver(
        dest,
        docroot=root,
        base_dir=root,
        single_source=True,
        create_dir=create_dir,
        pair_mode=False,
    )
    expected = RULE[(kind, state, create_dir)]
    if expected == "error":
        with pytest.raises(PathError, match="does not exist"):
            resolver.prepare()
        return
    resolver.prepare()
    target = root.resolve() / dest.lstrip("/")
    assert target.is_dir() or expected == "rename"
    incoming = ["src.txt"] if kind == "file" else ["src", "src/inner.txt"]
    got = [resolver.path_for(rel) for rel in incoming]
    if expected == "rename":
        assert resolver.renames
        assert got == [target, target / "inner.txt"][: len(incoming)]
    else:
        assert not resolver.renames
        assert got == [target / rel for rel in incoming]


@pytest.mark.parametrize("state", DEST_STATES)
@pytest.mark.parametrize("create_dir", [False, True])
@pytest.mark.parametrize("pair_mode", [False, True])
def test_several_sources_always_mean_a_folder(
    tmp_path: Path, state: str, create_dir: bool, pair_mode: bool
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    dest = _dest_for(root, state)
    resolver = DestinationResolver(
        dest,
        docroot=root,
        base_dir=root,
        single_source=False,
        create_dir=create_dir,
        pair_mode=pair_mode,
    )
    if state != "existing-dir" and not create_dir:
        with pytest.raises(PathError, match="create_dir"):
            resolver.prepare()
        return
    resolver.prepare()
    assert not resolver.renames
    target = root.resolve() / dest.lstrip("/")
    assert resolver.path_for("a/b.txt") == target / "a" / "b.txt"


def test_pair_mode_single_source_is_never_a_rename(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    resolver = DestinationResolver(
        "/new",
        docroot=root,
        base_dir=root,
        single_source=True,
        create_dir=False,
        pair_mode=True,
    )
    with pytest.raises(PathError, match="does not exist"):
        resolver.prepare()


def test_existing_file_destination(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tree(root, {"report.txt": "old"})
    single = DestinationResolver(
        "report.txt",
        docroot=root,
        base_dir=root,
        single_source=True,
        create_dir=False,
        pair_mode=False,
    )
    single.prepare()  # re-sending to the same name reaches the overwrite policy
    assert single.path_for("new.txt") == root.resolve() / "report.txt"
    with pytest.raises(PathError, match="is a file"):
        single.path_for("folder", kind="dir")
    for kwargs in ({"single_source": False}, {"create_dir": True}, {"pair_mode": True}):
        args = {"single_source": True, "create_dir": False, "pair_mode": False, **kwargs}
        resolver = DestinationResolver("report.txt", docroot=root, base_dir=root, **args)
        with pytest.raises(PathError, match="is a file"):
            resolver.prepare()


def test_path_for_before_prepare(tmp_path: Path) -> None:
    resolver = DestinationResolver(
        "/",
        docroot=tmp_path,
        base_dir=tmp_path,
        single_source=False,
        create_dir=False,
        pair_mode=False,
    )
    with pytest.raises(RuntimeError):
        resolver.path_for("a")


# --- DestinationResolver: confinement --------------------------------------------------


def test_destination_is_confined(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tree(root, {"in": None})
    (tmp_path / "outside").mkdir()
    os.symlink("../outside", root / "esc")
    os.symlink("../../outside", root / "in" / "esc")
    os.symlink("in", root / "in-link")
    common = {"docroot": root, "base_dir": root, "single_source": False, "pair_mode": False}
    with pytest.raises(DocrootViolation):
        DestinationResolver("../x", create_dir=True, **common)  # type: ignore[arg-type]
    with pytest.raises(DocrootViolation):
        DestinationResolver("esc", create_dir=True, **common).prepare()  # type: ignore[arg-type]
    resolver = DestinationResolver("/", create_dir=False, **common)  # type: ignore[arg-type]
    resolver.prepare()
    assert resolver.path_for("a.txt") == root.resolve() / "a.txt"
    assert resolver.path_for("in-link/a.txt") == root.resolve() / "in" / "a.txt"
    for rel in ["../x", "/etc/passwd", "a/../../x", "a\x00", "", "a//b"]:
        with pytest.raises(DocrootViolation):
            resolver.path_for(rel)
    for rel in ["esc/x", "in/esc/x", "esc"]:
        with pytest.raises(DocrootViolation):
            resolver.path_for(rel)
    assert not (tmp_path / "outside" / "x").exists()


def test_create_dir_makes_parents_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(".", root / "self")
    resolver = DestinationResolver(
        "/self/a/b",
        docroot=root,
        base_dir=root,
        single_source=False,
        create_dir=True,
        pair_mode=False,
    )
    resolver.prepare()
    assert (root / "a" / "b").is_dir()
    (root / "file").write_text("x")
    blocked = DestinationResolver(
        "/file/sub",
        docroot=root,
        base_dir=root,
        single_source=False,
        create_dir=True,
        pair_mode=False,
    )
    with pytest.raises(PathError, match="not a folder"):
        blocked.prepare()


def test_ensure_parent_for_deep_pair_paths(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    resolver = DestinationResolver(
        "/", docroot=root, base_dir=root, single_source=True, create_dir=False, pair_mode=True
    )
    resolver.prepare()
    target = resolver.ensure_parent("x/y/z.txt")
    assert target == root.resolve() / "x/y/z.txt"
    assert target.parent.is_dir() and not target.exists()


def test_client_side_destination_without_docroot(tmp_path: Path) -> None:
    make_tree(tmp_path, {"downloads": None, "elsewhere": None})
    os.symlink(tmp_path / "elsewhere", tmp_path / "downloads" / "big")
    resolver = DestinationResolver(
        "downloads",
        docroot=None,
        base_dir=tmp_path,
        single_source=False,
        create_dir=False,
        pair_mode=False,
    )
    resolver.prepare()
    # The user's own links are theirs to use; only the peer's relative path is checked.
    assert resolver.path_for("big/f.txt") == tmp_path / "downloads" / "big" / "f.txt"
    with pytest.raises(DocrootViolation):
        resolver.path_for("../f.txt")
    absolute = DestinationResolver(
        str(tmp_path / "new-name"),
        docroot=None,
        base_dir=Path("/nonexistent"),
        single_source=True,
        create_dir=False,
        pair_mode=False,
    )
    absolute.prepare()
    assert absolute.renames
    assert absolute.path_for("f.txt") == tmp_path / "new-name"


def test_server_base_dir_below_docroot(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_tree(root, {"home/alice": None})
    resolver = DestinationResolver(
        "inbox",
        docroot=root,
        base_dir=root / "home/alice",
        single_source=False,
        create_dir=True,
        pair_mode=False,
    )
    resolver.prepare()
    assert resolver.path_for("f") == root.resolve() / "home/alice/inbox/f"
