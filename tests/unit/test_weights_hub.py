"""``python -m worker.weights pull`` against a hub on loopback: the real ``HuggingFaceHub`` and the
installed ``huggingface_hub`` (``model_info``, then ``snapshot_download``'s tree listing, HEAD and
GET on ``resolve``, LFS files through a redirect to a CDN), run as the CLI in a child process
with ``HF_ENDPOINT`` naming ``testkit.hub``'s server. What is not the hub's own: the server
(``testkit/hub.py`` speaks the part of its API these calls use, over the small random-weight
model's files); the Xet protocol is never offered, so the files come over plain HTTP.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from localfleet.process import settings_env
from routing.catalog import CATALOG
from routing.settings import Settings
from testkit.hub import LocalHub, repo_from_folder, serve_hub
from worker.weights.files import folder_files, select
from worker.weights.hub import pulled_commit

ROOT = Path(__file__).resolve().parents[2]
SPEC = CATALOG["z-image-turbo"]
COMMIT = "5d1c6f3a0b9e8d7c6b5a49382716f5e4d3c2b1a0"
TOKEN = "hf_test_token_for_the_loopback_hub"

# What hub repositories carry beside the files a pipeline loads, and one file whose name an
# fnmatch pattern would not match as written.
EXTRAS = {
    "README.md": b"# model card",
    ".gitattributes": b"*.safetensors filter=lfs",
    "assets/sample.png": b"\x89PNG",
    "z_image_turbo_bf16.safetensors": b"single-file format of the same weights",
    "transformer/diffusion_pytorch_model.bin": b"the same weights as a pickle",
    "tokenizer/added_tokens[v2].json": b"{}",
}


def _pull(hub: LocalHub, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    child_env = settings_env(Settings(model_root=tmp_path / "models"))
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET", "HF_ENDPOINT"):
        child_env.pop(name, None)
    child_env |= {
        "PYTHONPATH": str(ROOT),
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    } | env
    return subprocess.run(
        [sys.executable, "-m", "worker.weights", "pull", SPEC.key],
        cwd=ROOT,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def gated_hub(small_models_dir: Path) -> LocalHub:
    repo = repo_from_folder(small_models_dir / SPEC.key, COMMIT, token=TOKEN)
    repo.files |= EXTRAS
    return LocalHub({SPEC.hub_id: repo})


def test_pull_downloads_the_selected_files_from_the_hub_api(gated_hub: LocalHub, tmp_path: Path) -> None:
    repo = gated_hub.repos[SPEC.hub_id]
    weights = "transformer/diffusion_pytorch_model.safetensors"
    # Its first download is cut halfway: the client must fetch it again, whole.
    weights_blob = f"/blobs/{hashlib.sha256(repo.files[weights]).hexdigest()}"
    gated_hub.cut_once.add(weights_blob.removeprefix("/blobs/"))
    with serve_hub(gated_hub):
        done = _pull(gated_hub, tmp_path, HF_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr

    folder = tmp_path / "models" / SPEC.key
    expected = select(repo.files, SPEC)
    assert "tokenizer/added_tokens[v2].json" in expected
    assert [rel for rel in EXTRAS if rel in expected] == ["tokenizer/added_tokens[v2].json"]
    assert folder_files(folder) == expected
    for rel in expected:
        assert (folder / rel).read_bytes() == repo.files[rel], rel
    # Beside them only the client's own bookkeeping and the record of the commit.
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [".cache", ".fleet"]
    assert pulled_commit(folder) == COMMIT
    assert f"at {COMMIT}" in done.stdout

    seen = gated_hub.seen
    hub_calls = [s for s in seen if s.server == "hub" and SPEC.hub_id in s.path]
    cdn_calls = [s for s in seen if s.server == "cdn"]
    # Every call for the repository carried the token; none to the CDN did.
    assert hub_calls and all(s.headers.get("authorization") == f"Bearer {TOKEN}" for s in hub_calls)
    assert cdn_calls and not any("authorization" in s.headers for s in cdn_calls)
    assert any(s.path == f"/api/models/{SPEC.hub_id}/revision/{SPEC.revision}" for s in hub_calls)
    # The listing was followed over all its pages, at the commit, not the branch.
    trees = [s for s in hub_calls if "/tree/" in s.path]
    folders = {"/".join(p.split("/")[:depth]) for p in repo.files for depth in range(1, p.count("/") + 1)}
    assert len(trees) == -(-(len(repo.files) + len(folders)) // gated_hub.page_size) > 1
    assert all(s.path.startswith(f"/api/models/{SPEC.hub_id}/tree/{COMMIT}") for s in trees)
    # Only the selected files were asked for.
    resolved = {s.path.split(f"/resolve/{COMMIT}/", 1)[1] for s in hub_calls if "/resolve/" in s.path}
    assert resolved == set(expected)
    assert [s.path for s in cdn_calls].count(weights_blob) == 2
    assert not gated_hub.cut_once


def test_a_gated_repository_without_a_token_is_refused_saying_what_to_set(
    gated_hub: LocalHub, tmp_path: Path
) -> None:
    with serve_hub(gated_hub):
        done = _pull(gated_hub, tmp_path)

    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith(f"{SPEC.key}: not pulled: {SPEC.hub_id} on {gated_hub.endpoint}"), message
    assert "refused access (gated)" in message and "set HF_TOKEN" in message, message
    assert not any(s.server == "cdn" for s in gated_hub.seen)
    assert not folder_files(tmp_path / "models" / SPEC.key)
