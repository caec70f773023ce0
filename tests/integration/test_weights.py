"""Weights through the object store: mirrored to a real S3-protocol server (moto on loopback),
filled into a node cache by ranged reads, checked against the manifest, and loaded by a real
worker process that then runs a job; pulled from a hub on loopback (``testkit.hub``) with the
files of a second repository, and held at what was mirrored when the hub moves on."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import SecretStr

from localfleet.process import settings_env
from producer.client import Client
from routing.catalog import CATALOG
from routing.io.storage import LocalStorage, S3Storage
from routing.jobs.record import JobStatus
from routing.settings import Settings
from testkit.hub import HubRepo, LocalHub, repo_from_folder, serve_hub
from worker.weights import local_weights
from worker.weights.files import file_key, folder_files, sha256_of
from worker.weights.fill import WeightsError, fill
from worker.weights.hub import HuggingFaceHub, pull
from worker.weights.mirror import MirrorConflict, mirror

pytestmark = pytest.mark.integration

MODEL = "z-image-turbo"
ANIMATE = "wan2.2-animate-14b"
ROOT = Path(__file__).resolve().parents[2]
# Small chunks, so the small model's files are many ranged reads each, in parallel.
CHUNK = 64 * 1024


@pytest.fixture
def s3(s3_server: str) -> S3Storage:
    storage = S3Storage(
        f"weights-{uuid.uuid4().hex[:12]}", s3_server, access_key_id="test", secret_access_key="test"
    )
    storage.ensure_bucket()
    return storage


@pytest.fixture
def s3_settings(fleet_settings: Settings, s3: S3Storage, tmp_path: Path) -> Settings:
    """The fleet on the S3 server, with an empty node cache and no other source of weights."""
    return fleet_settings.model_copy(
        update={
            "storage_backend": "s3",
            "s3_endpoint_url": s3.client.meta.endpoint_url,
            "s3_bucket": s3.bucket,
            "s3_access_key_id": SecretStr("test"),
            "s3_secret_access_key": SecretStr("test"),
            "model_root": None,
            "weights_cache_dir": tmp_path / "node-cache",
            "weights_fill_chunk_bytes": CHUNK,
            "weights_fill_threads": 4,
        }
    )


def _same_as_mirror(folder: Path, manifest) -> None:
    assert folder_files(folder) == [f.path for f in manifest.files]
    for entry in manifest.files:
        assert sha256_of(folder / entry.path) == entry.sha256, entry.path
    assert not [p for p in folder.rglob("*.part")]


def test_a_worker_fills_an_empty_node_cache_from_the_store_and_runs_a_job(
    s3: S3Storage, s3_settings: Settings, small_models_dir: Path, start_worker
) -> None:
    manifest = mirror(s3, CATALOG[MODEL], small_models_dir / MODEL)
    assert s3.list(f"weights/{MODEL}/main/") == sorted(
        [
            f"weights/{MODEL}/main/manifest.json",
            *(file_key(CATALOG[MODEL], manifest, f.path) for f in manifest.files),
        ]
    )

    worker = start_worker(s3_settings)
    with Client(s3_settings) as client:
        record = client.submit(
            {"model": MODEL, "prompt": "a fox", "width": 64, "height": 64, "steps": 2}
        ).wait(timeout_s=120)

    assert record.status is JobStatus.SUCCEEDED, record.error
    assert record.timings["load_s"] > 0
    _same_as_mirror(s3_settings.weights_cache_dir / MODEL, manifest)
    assert f"fetching {len(manifest.files)} of {len(manifest.files)} files" in worker.log()


def test_a_variants_checkpoint_comes_to_the_node_through_the_store_as_a_models_weights_do(
    s3: S3Storage, s3_settings: Settings, small_models_dir: Path, tmp_path: Path, start_worker
) -> None:
    """FastWan's checkpoint, mirrored under its own key (``<model>:<variant>``), is filled into
    the node cache by the worker on the first job that asks for the variant: no hub, no
    FLEET_VARIANT_WEIGHTS."""
    from routing.catalog import weights_spec
    from testkit.small_models.lora import build_checkpoint

    model, key = "wan2.2-ti2v-5b", "wan2.2-ti2v-5b:fastwan-3"
    mirror(s3, CATALOG[model], small_models_dir / model)
    manifest = mirror(s3, weights_spec(key), build_checkpoint(small_models_dir / model, tmp_path / "fastwan"))
    assert [f.path for f in manifest.files] == [
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
    ]

    worker = start_worker(s3_settings)
    base = {
        "model": model,
        "kind": "text-to-video",
        "prompt": "waves",
        "width": 64,
        "height": 64,
        "frames": 5,
    }
    with Client(s3_settings) as client:
        record = client.submit(base | {"variant": "fastwan-3", "seed": 1}).wait(timeout_s=180)

    assert record.status is JobStatus.SUCCEEDED, record.error
    assert record.timings["variant_checkpoint"] == 1 and record.timings["variant_load_s"] > 0
    _same_as_mirror(s3_settings.weights_cache_dir / key, manifest)
    assert f"variant fastwan-3 loaded from {s3_settings.weights_cache_dir / key}" in worker.log()


def test_a_truncated_or_altered_cache_file_is_fetched_again(
    s3: S3Storage, s3_settings: Settings, small_models_dir: Path
) -> None:
    spec = CATALOG[MODEL]
    manifest = mirror(s3, spec, small_models_dir / MODEL)
    first = fill(s3, spec, s3_settings.weights_cache_dir, chunk_bytes=CHUNK, threads=4)
    assert sorted(first.fetched) == [f.path for f in manifest.files]
    folder = first.folder

    truncated, altered = (
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    )
    with open(folder / truncated, "r+b") as f:
        f.truncate((folder / truncated).stat().st_size // 2)
    with open(folder / altered, "r+b") as f:  # same size, one byte changed
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    (folder / "leftover.safetensors").write_bytes(b"an older revision's shard")
    (folder / "transformer" / ".diffusion_pytorch_model.safetensors.x.part").write_bytes(
        b"a killed fill's part"
    )

    again = fill(s3, spec, s3_settings.weights_cache_dir, chunk_bytes=CHUNK, threads=4)

    assert sorted(again.fetched) == [truncated, altered]
    _same_as_mirror(folder, manifest)
    # Unchanged since checked: nothing fetched, nothing hashed again.
    assert fill(s3, spec, s3_settings.weights_cache_dir, chunk_bytes=CHUNK, threads=4).fetched == []


def test_a_damaged_mirror_is_refused_after_its_attempts(
    s3: S3Storage, s3_settings: Settings, small_models_dir: Path
) -> None:
    spec = CATALOG[MODEL]
    manifest = mirror(s3, spec, small_models_dir / MODEL)
    damaged = manifest.files[0]
    s3.put(file_key(spec, manifest, damaged.path), b"\0" * damaged.size, "application/octet-stream")

    with pytest.raises(WeightsError, match=f"{damaged.path} differed from the manifest"):
        fill(s3, spec, s3_settings.weights_cache_dir, chunk_bytes=CHUNK, threads=4)
    assert not (s3_settings.weights_cache_dir / MODEL / damaged.path).exists()


def test_the_local_store_fills_the_same_way_and_no_mirror_falls_back_to_the_settings(
    fleet_settings: Settings, small_models_dir: Path, tmp_path: Path
) -> None:
    settings = fleet_settings.model_copy(update={"weights_cache_dir": tmp_path / "node-cache"})
    store = LocalStorage(settings.storage_dir)
    spec = CATALOG["wan2.2-s2v-14b"]  # the official checkpoint layout goes the same way

    # No mirror yet: the configured weights (here the small models' root).
    assert local_weights(settings, spec, store) == str(small_models_dir / spec.key)

    manifest = mirror(store, spec, small_models_dir / spec.key)
    folder = local_weights(settings, spec, store)

    assert folder == str(tmp_path / "node-cache" / spec.key)
    _same_as_mirror(Path(folder), manifest)


def test_two_processes_filling_one_cache_fetch_once_and_no_partial_file_is_seen(
    s3: S3Storage, s3_settings: Settings, small_models_dir: Path, tmp_path: Path
) -> None:
    import fcntl

    spec = CATALOG[MODEL]
    manifest = mirror(s3, spec, small_models_dir / MODEL)
    expected = {f.path: (f.size, f.sha256) for f in manifest.files}
    cache = s3_settings.weights_cache_dir
    cache.mkdir(parents=True)
    env = settings_env(s3_settings) | {"PYTHONPATH": str(ROOT)}

    # Both start while the model's lock is held here, so both are filling at once when it is let go.
    with open(cache / f".{MODEL}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        logs = [tmp_path / f"fill-{i}.log" for i in range(2)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "worker.weights", "fill", MODEL],
                cwd=ROOT,
                env=env,
                stdout=open(log, "wb"),
                stderr=subprocess.STDOUT,
            )
            for log in logs
        ]
        deadline = time.monotonic() + 30
        while not all("waiting for another process" in log.read_text() for log in logs):
            assert time.monotonic() < deadline, [log.read_text() for log in logs]
            assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            time.sleep(0.05)

        seen_partial: list[str] = []
        done = threading.Event()

        def watch() -> None:
            folder = cache / MODEL
            while not done.is_set():
                for rel in folder_files(folder) if folder.is_dir() else []:
                    # Parts are written at their full size: only the bytes tell a whole file.
                    try:
                        seen = ((folder / rel).stat().st_size, sha256_of(folder / rel))
                    except FileNotFoundError:
                        continue
                    if seen != expected.get(rel):
                        seen_partial.append(f"{rel}: {seen[0]} bytes")

        watcher = threading.Thread(target=watch)
        watcher.start()
        fcntl.flock(lock, fcntl.LOCK_UN)

    try:
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        done.set()
        watcher.join()
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], outputs
    fetched = sorted(out.split("fetched ")[-1].split(" ")[0] for out in outputs)
    assert fetched == ["0", str(len(manifest.files))], outputs
    assert seen_partial == []
    _same_as_mirror(cache / MODEL, manifest)
    assert sorted(os.listdir(cache)) == sorted([f".{MODEL}.lock", MODEL])


def _animate_hub(small_models_dir: Path) -> LocalHub:
    """Animate's two repositories on the loopback hub: the diffusers one the pipeline loads, and
    the official one, of which the fleet takes only ``process_checkpoint``."""
    spec = CATALOG[ANIMATE]
    built = repo_from_folder(small_models_dir / ANIMATE, "d" * 40).files
    preprocessing = {rel: data for rel, data in built.items() if rel.startswith("process_checkpoint/")}
    diffusers = {rel: data for rel, data in built.items() if rel not in preprocessing}
    official = preprocessing | {
        "diffusion_pytorch_model-00001-of-00004.safetensors": b"the official DiT: not the fleet's",
        "README.md": b"# Wan2.2-Animate-14B",
    }
    [extra] = spec.extra_files
    return LocalHub(
        {spec.hub_id: HubRepo(diffusers, "d" * 40), extra.hub_id: HubRepo(official, "0" * 39 + "1")}
    )


def test_a_moved_upstream_changes_no_node_until_the_mirror_is_replaced_and_a_pin_is_held(
    s3: S3Storage, s3_settings: Settings, small_models_dir: Path, tmp_path: Path
) -> None:
    spec = CATALOG[ANIMATE]
    [extra] = spec.extra_files
    hub = _animate_hub(small_models_dir)
    official = hub.repos[extra.hub_id]
    detector = "process_checkpoint/det/yolov10m.onnx"
    pulled = tmp_path / "pulled" / ANIMATE
    node = s3_settings.weights_cache_dir
    with serve_hub(hub):
        client = HuggingFaceHub(endpoint=hub.endpoint)
        first = pull(spec, pulled, client)
        assert first.commits == {spec.hub_id: "d" * 40, extra.hub_id: official.commit}
        manifest = mirror(s3, spec, pulled)
        assert manifest.commits == first.commits
        assert fill(s3, spec, node, chunk_bytes=CHUNK, threads=4).commits == first.commits
        _same_as_mirror(node / ANIMATE, manifest)
        assert (node / ANIMATE / detector).read_bytes() == official.files[detector]

        # Upstream moves on: a new detector at a new commit, pulled again.
        old_detector = official.files[detector]
        official.files[detector] = old_detector + b"\0"
        official.commit = "0" * 39 + "2"
        assert pull(spec, pulled, client).commits[extra.hub_id] == official.commit
        pinned = replace(spec, extra_files=(replace(extra, revision=official.commit),))
        pull(pinned, tmp_path / "pinned", client)
    # The pin was asked for as it is; no branch was.
    pinned_calls = [s.path for s in hub.seen if s.path.startswith(f"/api/models/{extra.hub_id}/revision/")]
    assert pinned_calls[-1].endswith(f"/revision/{official.commit}") and len(pinned_calls) == 3

    # The mirror is not changed by the new pull, so no node is.
    with pytest.raises(MirrorConflict, match=rf"{extra.hub_id}@0+1.*than .*{extra.hub_id}@0+2.*--replace"):
        mirror(s3, spec, pulled)
    assert fill(s3, spec, node, chunk_bytes=CHUNK, threads=4).fetched == []
    assert (node / ANIMATE / detector).read_bytes() == old_detector
    # A folder of another commit than the catalog pins is refused.
    with pytest.raises(MirrorConflict, match=f"pins {extra.hub_id} at {'0' * 39}1"):
        mirror(s3, replace(spec, extra_files=(replace(extra, revision="0" * 39 + "1"),)), pulled)

    # Replaced on purpose: the nodes move to it, fetching what changed; the old files stay for
    # fills still reading them.
    replaced = mirror(s3, spec, pulled, replace=True)
    report = fill(s3, spec, node, chunk_bytes=CHUNK, threads=4)
    assert report.fetched == [detector] and report.commits[extra.hub_id] == official.commit
    _same_as_mirror(node / ANIMATE, replaced)
    assert s3.get(file_key(spec, manifest, detector)) == old_detector
