"""LocalStorage on a temporary directory."""

from __future__ import annotations

import hashlib
import os
import time
import urllib.request
from pathlib import Path

import pytest

from routing.io.storage import (
    LocalStorage,
    ObjectNotFound,
    Storage,
    StorageError,
    make_storage,
    output_key,
)
from routing.settings import Settings


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "objects")


def test_put_then_get(storage: LocalStorage) -> None:
    key = output_key("0123abcd", 1, 0, "png")
    stored = storage.put(key, b"\x89PNG data", "image/png")
    assert storage.get(key) == b"\x89PNG data"
    assert storage.exists(key)
    assert stored.size_bytes == 9 and stored.sha256 == hashlib.sha256(b"\x89PNG data").hexdigest()
    assert (storage.root / "jobs/0123abcd/attempt-1/output-0.png").read_bytes() == b"\x89PNG data"


def test_url_is_a_file_uri_urllib_can_open(storage: LocalStorage) -> None:
    key = output_key("0123abcd", 1, 2, "jpg")
    storage.put(key, b"jpeg bytes", "image/jpeg")
    url = storage.url(key, expires_s=60)
    assert url.startswith("file://")
    with urllib.request.urlopen(url) as resp:
        assert resp.read() == b"jpeg bytes"


def test_second_put_overwrites_and_leaves_no_temp_files(storage: LocalStorage) -> None:
    key = output_key("0123abcd", 1, 0, "png")
    storage.put(key, b"first delivery", "image/png")
    storage.put(key, b"redelivered", "image/png")
    assert storage.get(key) == b"redelivered"
    assert storage.list("jobs/0123abcd/") == [key]
    assert os.listdir(storage.root / "jobs/0123abcd/attempt-1") == ["output-0.png"]


def test_list_is_a_string_prefix_and_sorted(storage: LocalStorage) -> None:
    for k in ["jobs/aaaa0000/output-1.png", "jobs/aaaa0000/output-0.png", "jobs/aaaa00001/x.png"]:
        storage.put(k, b"x", "image/png")
    assert storage.list("jobs/aaaa0000/") == [
        "jobs/aaaa0000/output-0.png",
        "jobs/aaaa0000/output-1.png",
    ]
    assert len(storage.list("jobs/aaaa0000")) == 3
    assert storage.list("nothing/here/") == []


def test_missing_key(storage: LocalStorage) -> None:
    with pytest.raises(ObjectNotFound):
        storage.get("jobs/0123abcd/output-0.png")
    assert not storage.exists("jobs/0123abcd/output-0.png")
    storage.put("jobs/0123abcd/output-0.png", b"x", "image/png")
    with pytest.raises(ObjectNotFound):
        storage.get("jobs/0123abcd")  # a directory is not an object
    storage.delete("jobs/0123abcd/output-0.png")
    storage.delete("jobs/0123abcd/output-0.png")  # deleting twice is fine
    assert not storage.exists("jobs/0123abcd/output-0.png")


@pytest.mark.parametrize(
    "key", ["../escape.png", "jobs/../../escape.png", "/etc/passwd", "", "a//b", "a/./b", "a\\b"]
)
def test_keys_escaping_the_root_are_rejected(storage: LocalStorage, key: str) -> None:
    with pytest.raises(ValueError):
        storage.put(key, b"x", "image/png")
    with pytest.raises(ValueError):
        storage.get(key)
    assert not (storage.root.parent / "escape.png").exists()


def test_symlink_out_of_the_root_is_rejected(storage: LocalStorage, tmp_path: Path) -> None:
    storage.root.mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (storage.root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError):
        storage.put("link/file.png", b"x", "image/png")
    assert not (tmp_path / "outside/file.png").exists()


@pytest.mark.parametrize(
    "job_id, attempt, index, ext",
    [
        ("../x", 1, 0, "png"),
        ("ABCDEF12", 1, 0, "png"),
        ("abc", 1, 0, "png"),
        ("0123abcd", 0, 0, "png"),
        ("0123abcd", True, 0, "png"),
        ("0123abcd", 1, -1, "png"),
        ("0123abcd", 1, True, "png"),
        ("0123abcd", 1, 0, "p/ng"),
        ("0123abcd", 1, 0, ""),
    ],
)
def test_output_key_rejects_bad_parts(job_id: str, attempt: int, index: int, ext: str) -> None:
    with pytest.raises(ValueError):
        output_key(job_id, attempt, index, ext)


def test_output_key_shape() -> None:
    assert output_key("0123abcd", 1, 3, ".PNG") == "jobs/0123abcd/attempt-1/output-3.png"
    uid = "123e4567-e89b-12d3-a456-426614174000"
    assert output_key(uid, 2, 0, "mp4") == f"jobs/{uid}/attempt-2/output-0.mp4"


def test_make_storage_local(tmp_path: Path) -> None:
    storage = make_storage(Settings(storage_backend="local", storage_dir=tmp_path / "o"))
    assert isinstance(storage, LocalStorage) and isinstance(storage, Storage)
    storage.put("a/b.txt", b"hi", "text/plain")
    assert (tmp_path / "o/a/b.txt").read_bytes() == b"hi"


def test_failed_write_keeps_old_bytes_and_leaves_no_temp_file(
    storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = output_key("0123abcd", 1, 0, "png")
    storage.put(key, b"old", "image/png")

    def crash(*_: object) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError):
        storage.put(key, b"new", "image/png")
    assert storage.get(key) == b"old"
    assert os.listdir(storage.root / "jobs/0123abcd/attempt-1") == ["output-0.png"]


def test_list_skips_temp_files_of_a_crashed_writer(storage: LocalStorage) -> None:
    key = output_key("0123abcd", 1, 0, "png")
    storage.put(key, b"x", "image/png")
    (storage.root / "jobs/0123abcd/.output-1.png.k3j2.tmp").write_bytes(b"half")
    assert storage.list("jobs/") == [key]


def test_touch_makes_an_objects_last_write_now_and_says_when_there_is_none(storage: LocalStorage) -> None:
    key = "loras/" + "b" * 64 + ".safetensors"
    assert storage.touch(key) is False and not storage.exists(key)
    storage.put(key, b"weights", "application/octet-stream")
    path = storage.root / key
    os.utime(path, (1_000_000, 1_000_000))
    assert storage.touch(key) is True
    assert abs(path.stat().st_mtime - time.time()) < 60
    assert storage.get(key) == b"weights"


def test_get_range_reads_from_an_offset_and_stops_at_the_end(storage: LocalStorage) -> None:
    storage.put("weights/m/main/files/a.bin", bytes(range(100)), "application/octet-stream")
    assert storage.get_range("weights/m/main/files/a.bin", 10, 5) == bytes(range(10, 15))
    assert storage.get_range("weights/m/main/files/a.bin", 95, 10) == bytes(range(95, 100))
    with pytest.raises(ObjectNotFound):
        storage.get_range("weights/m/main/files/missing.bin", 0, 1)
    with pytest.raises(ValueError):
        storage.get_range("weights/m/main/files/a.bin", 0, 0)
