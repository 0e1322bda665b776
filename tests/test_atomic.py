"""mambamim.atomic: a write either completes or leaves the previous file and no temp file."""

import json
import os
import stat

import pytest

from mambamim.atomic import atomic_write, write_json_atomic, write_text_atomic


class _Crash(Exception):
    pass


def test_crash_mid_write_keeps_previous_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "data.bin"
    p.write_bytes(b"old content")
    with pytest.raises(_Crash):
        with atomic_write(p) as f:
            f.write(b"new partial")
            f.flush()
            assert os.path.exists(f.name) and os.path.dirname(f.name) == str(tmp_path)
            raise _Crash
    assert p.read_bytes() == b"old content"
    assert sorted(os.listdir(tmp_path)) == ["data.bin"]


def test_crash_on_first_write_creates_nothing(tmp_path):
    p = tmp_path / "sub" / "new.json"
    with pytest.raises(_Crash):
        with atomic_write(p, "w"):
            raise _Crash
    assert os.listdir(tmp_path / "sub") == []


def test_success_replaces_content_and_temp_keeps_suffix(tmp_path):
    p = tmp_path / "img.nii.gz"
    p.write_bytes(b"old")
    with atomic_write(p) as f:
        assert os.path.basename(f.name).startswith(".tmp-") and f.name.endswith(".nii.gz")
        f.write(b"new")
    assert p.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["img.nii.gz"]


def test_writes_through_the_temp_name_count(tmp_path):
    p = tmp_path / "out.txt"
    with atomic_write(p) as f:
        with open(f.name, "wb") as other:  # how nibabel writes: to a file name
            other.write(b"via name")
    assert p.read_bytes() == b"via name"


def test_text_and_json_helpers(tmp_path):
    t = write_text_atomic(tmp_path / "a" / "note.md", "héllo\n")
    assert t.read_text(encoding="utf-8") == "héllo\n"
    j = write_json_atomic(tmp_path / "x.json", {"a": [1, 2.5, None]}, indent=1)
    text = j.read_text()
    assert text.endswith("\n") and json.loads(text) == {"a": [1, 2.5, None]}
    assert text == json.dumps({"a": [1, 2.5, None]}, indent=1) + "\n"
    write_json_atomic(j, {"b": 1})
    assert json.loads(j.read_text()) == {"b": 1}


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "f.png") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f.png").st_mode) == 0o644


def test_rejects_non_write_modes(tmp_path):
    for mode in ("r", "a", "ab", "x"):
        with pytest.raises(ValueError, match="mode"):
            with atomic_write(tmp_path / "f", mode):
                pass
    assert os.listdir(tmp_path) == []
