"""Atomic files (`diffusers_mar.atomic_files`): complete or absent, never partial, with a plain file's permissions."""

from __future__ import annotations

import os
import stat

import pytest

from diffusers_mar.atomic_files import atomic_write, current_umask, publish, temporary_beside


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_atomic_write_writes_the_bytes(tmp_path):
    atomic_write(tmp_path / "a.txt", lambda file: file.write(b"hello"))
    assert (tmp_path / "a.txt").read_bytes() == b"hello"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.txt"]  # no temporary file left


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_write_leaves_no_partial_file_and_replaces_nothing(tmp_path, existing):
    path = tmp_path / "a.txt"
    if existing:
        path.write_bytes(b"old")

    def write(file):
        file.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(path, write)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["a.txt"] if existing else [])
    if existing:
        assert path.read_bytes() == b"old"


def test_the_file_gets_what_a_plain_open_gives(tmp_path, umask_027):
    assert current_umask() == 0o027
    atomic_write(tmp_path / "atomic", lambda file: file.write(b"x"))
    (tmp_path / "plain").write_bytes(b"x")
    plain = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert plain == 0o640
    assert stat.S_IMODE((tmp_path / "atomic").stat().st_mode) == plain  # not mkstemp's 0600


def test_temporary_beside_and_publish(tmp_path):
    path = tmp_path / "a.npz"
    temporary = temporary_beside(path)
    assert temporary.parent == tmp_path and temporary.name.startswith(".a.npz.") and temporary.suffix == ".tmp"
    temporary.write_bytes(b"done")
    assert not path.exists()
    publish(temporary, path)
    assert path.read_bytes() == b"done" and not temporary.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~current_umask()
