"""S3Storage against a standalone moto server, over real HTTP."""

from __future__ import annotations

import hashlib
import time
import urllib.parse
import urllib.request
import uuid

import pytest

from routing.io.storage import ObjectNotFound, S3Storage, StorageError, make_storage, output_key
from routing.settings import Settings

pytestmark = pytest.mark.integration

CREDS = {"access_key_id": "testing", "secret_access_key": "testing"}


@pytest.fixture
def storage(s3_server: str) -> S3Storage:
    # A bucket per test: the server lives for the whole session.
    s = S3Storage(bucket=f"t-{uuid.uuid4().hex[:12]}", endpoint_url=s3_server, **CREDS)
    s.ensure_bucket()
    return s


def test_put_then_get_returns_same_bytes(storage: S3Storage) -> None:
    data = bytes(range(256)) * 10
    key = output_key(uuid.uuid4().hex, 1, 0, "png")
    stored = storage.put(key, data, "image/png")
    assert storage.get(key) == data
    assert storage.exists(key)
    assert (stored.key, stored.size_bytes, stored.content_type) == (key, len(data), "image/png")
    assert stored.sha256 == hashlib.sha256(data).hexdigest()


def test_presigned_url_serves_bytes_and_content_type(storage: S3Storage) -> None:
    key = output_key(str(uuid.uuid4()), 1, 1, "mp4")
    storage.put(key, b"not really a video", "video/mp4")
    url = storage.url(key, expires_s=120)
    # moto accepts any signature and ignores expiry, so only the URL's shape is checked here.
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["X-Amz-Expires"] == ["120"]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as resp:
        assert resp.read() == b"not really a video"
        assert resp.headers["Content-Type"] == "video/mp4"


def test_second_put_of_same_key_overwrites(storage: S3Storage) -> None:
    job_id = uuid.uuid4().hex
    key = output_key(job_id, 1, 0, "png")
    storage.put(key, b"first delivery", "image/png")
    storage.put(key, b"redelivered", "image/png")
    assert storage.list(f"jobs/{job_id}/") == [key]
    assert storage.get(key) == b"redelivered"


def test_get_missing_key_raises_object_not_found(storage: S3Storage) -> None:
    with pytest.raises(ObjectNotFound) as info:
        storage.get("jobs/deadbeef/output-0.png")
    assert info.value.key == "jobs/deadbeef/output-0.png"
    assert not storage.exists("jobs/deadbeef/output-0.png")


def test_missing_bucket_is_a_storage_error_not_a_missing_object(s3_server: str) -> None:
    s = S3Storage(bucket=f"absent-{uuid.uuid4().hex[:8]}", endpoint_url=s3_server, **CREDS)
    with pytest.raises(StorageError) as info:
        s.get("jobs/deadbeef/output-0.png")
    assert not isinstance(info.value, ObjectNotFound)


def test_delete_and_list(storage: S3Storage) -> None:
    keys = [output_key("c0ffee00", 1, i, "png") for i in range(3)]
    for k in keys:
        storage.put(k, b"x", "image/png")
    storage.put("jobs/c0ffee001/output-0.png", b"other job", "image/png")
    assert storage.list("jobs/c0ffee00/") == keys
    storage.delete(keys[1])
    storage.delete(keys[1])  # deleting twice is fine
    assert storage.list("jobs/c0ffee00/") == [keys[0], keys[2]]


def test_ensure_bucket_is_idempotent_outside_us_east_1(s3_server: str) -> None:
    s = S3Storage(f"eu-{uuid.uuid4().hex[:8]}", s3_server, region="eu-west-1", **CREDS)
    s.ensure_bucket()
    s.ensure_bucket()
    s.put("a/b.txt", b"hi", "text/plain")
    assert s.get("a/b.txt") == b"hi"


def test_make_storage_from_settings(s3_server: str) -> None:
    settings = Settings(
        storage_backend="s3",
        s3_endpoint_url=s3_server,
        s3_bucket=f"settings-{uuid.uuid4().hex[:8]}",
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
        presign_expiry_s=900,
    )
    storage = make_storage(settings)
    assert isinstance(storage, S3Storage)
    assert storage.bucket == settings.s3_bucket
    storage.ensure_bucket()
    storage.put("jobs/abcdef12/output-0.txt", b"via settings", "text/plain")
    assert storage.get("jobs/abcdef12/output-0.txt") == b"via settings"
    url = storage.url("jobs/abcdef12/output-0.txt")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["900"]
    assert query["X-Amz-Credential"][0].startswith("testing/")


def test_touch_copies_the_object_onto_itself_so_its_age_starts_again(storage: S3Storage) -> None:
    key = "loras/" + "c" * 64 + ".safetensors"
    assert storage.touch(key) is False and not storage.exists(key)
    storage.put(key, b"weights", "application/x-lora")
    before = storage.client.head_object(Bucket=storage.bucket, Key=key)["LastModified"]
    time.sleep(1.1)  # LastModified has whole seconds
    assert storage.touch(key) is True
    head = storage.client.head_object(Bucket=storage.bucket, Key=key)
    assert head["LastModified"] > before
    assert (storage.get(key), head["ContentType"]) == (b"weights", "application/x-lora")


@pytest.mark.parametrize("kind", ["temporary file", "bytes in memory"])
def test_put_file_stores_what_the_file_holds_from_its_start(storage: S3Storage, kind: str) -> None:
    """Uploads and fetched inputs go to the bucket from a temporary file; a LoRA named by a store
    key, from memory (hashlib reads a BytesIO through its buffer, without moving its position)."""
    import io
    import tempfile

    data = bytes(range(256)) * 4096  # 1 MiB
    key = f"loras/acme/{hashlib.sha256(data).hexdigest()}.safetensors"
    with tempfile.TemporaryFile() if kind == "temporary file" else io.BytesIO() as file:
        file.write(data)  # left at its end, as a download leaves it
        stored = storage.put_file(key, file, "application/octet-stream")
    assert storage.get(key) == data
    assert (stored.size_bytes, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())


def test_get_range_is_one_ranged_get(storage: S3Storage) -> None:
    storage.put("weights/m/main/files/a.bin", bytes(range(100)), "application/octet-stream")
    assert storage.get_range("weights/m/main/files/a.bin", 10, 5) == bytes(range(10, 15))
    assert storage.get_range("weights/m/main/files/a.bin", 95, 10) == bytes(range(95, 100))
    with pytest.raises(ObjectNotFound):
        storage.get_range("weights/m/main/files/missing.bin", 0, 1)
