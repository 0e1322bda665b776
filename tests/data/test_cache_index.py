"""``read_cache_index`` is the one reader of CACHE/dataset.json (also ``data.loaders.read_cache_index``)."""

from __future__ import annotations

import json

import pytest

from mambamim.data import cache, loaders
from mambamim.data.errors import DataError


def _index(root, cases, **extra):
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"format": "mambamim-cache", "version": 1, "cases": cases, **extra}))
    return root


def test_one_reader_with_empty_caches_refused_unless_allowed(tmp_path):
    assert loaders.read_cache_index is cache.read_cache_index
    full = _index(tmp_path / "full", [{"id": "a", "image": "cases/a/image.npy"}], labels=None)
    assert [c["id"] for c in cache.read_cache_index(full)["cases"]] == ["a"]
    empty = _index(tmp_path / "empty", [])
    with pytest.raises(DataError, match="holds no case"):
        loaders.read_cache_index(empty)
    assert cache.read_cache_index(empty, allow_empty=True)["cases"] == []
    assert cache.load_cache_index(empty)["cases"] == []


@pytest.mark.parametrize("content, problem", [
    (None, "no cache index"),
    ("{not json", "cannot parse"),
    (json.dumps({"format": "other", "version": 1, "cases": []}), "not a mambamim-cache index"),
    (json.dumps({"format": "mambamim-cache", "version": 9, "cases": []}), "version 9"),
    (json.dumps({"format": "mambamim-cache", "version": 1}), "no 'cases' list"),
])
def test_bad_indexes_are_named(tmp_path, content, problem):
    if content is not None:
        (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(DataError, match=problem) as err:
        cache.read_cache_index(tmp_path, allow_empty=True)
    assert "dataset.json" in str(err.value)
