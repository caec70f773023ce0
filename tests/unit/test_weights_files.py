"""Which files ``python -m worker.weights pull`` takes from a repository, and where they land.

What is real here: the repositories are real model folders (the small random-weight builds, in
the diffusers and the official S2V layouts) with the extra files hub repositories carry added
beside them, the file selection and the pulled folder are the code's own, and the pulled
Z-Image folder holds exactly the files the real ``ZImagePipeline`` loads in the fleet's tests.
``FolderHub`` lists a folder and copies the files asked for, to test the selection alone;
``test_weights_hub`` runs the real ``HuggingFaceHub`` and ``huggingface_hub`` against a hub API
on loopback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from routing.catalog import CATALOG, checkpoint_spec, weights_keys, weights_spec
from worker.weights.files import Manifest, check_relative, folder_files, manifest_of, select
from worker.weights.hub import pull, pulled_commit

# What hub repositories carry beside the files a pipeline loads.
EXTRAS = {
    "README.md": b"# model card",
    ".gitattributes": b"*.safetensors filter=lfs",
    "assets/sample.png": b"\x89PNG",
    "z_image_turbo_bf16.safetensors": b"single-file format of the same weights",
}


class FolderHub:
    """A hub repository stood in for by a local folder, at one commit."""

    commit = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, repo: Path):
        self.repo = repo
        self.asked: list[str] = []

    def list_files(self, repo_id: str, revision: str) -> tuple[str, list[str]]:
        return self.commit, folder_files(self.repo) + [".gitattributes"]

    def download(self, repo_id: str, commit: str, files: list[str], folder: Path) -> None:
        assert commit == self.commit
        self.asked = files
        for rel in files:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.repo / rel, folder / rel)


def _repo(tmp_path: Path, small_models_dir: Path, key: str, extras: dict[str, bytes]) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(small_models_dir / key, repo)
    for rel, data in extras.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(data)
    return repo


def test_pull_takes_the_files_the_pipeline_loads(tmp_path: Path, small_models_dir: Path) -> None:
    spec = CATALOG["z-image-turbo"]
    extras = EXTRAS | {"transformer/diffusion_pytorch_model.bin": b"the same weights as a pickle"}
    hub = FolderHub(_repo(tmp_path, small_models_dir, spec.key, extras))

    pulled = pull(spec, tmp_path / "pulled", hub)

    assert pulled.commit == hub.commit == pulled_commit(pulled.folder)
    # Exactly the files of the built model, which ZImagePipeline loads in every fleet test.
    assert (
        hub.asked == pulled.files == folder_files(pulled.folder) == folder_files(small_models_dir / spec.key)
    )
    for rel in extras:
        assert rel not in pulled.files, rel
    assert {
        "model_index.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "tokenizer/tokenizer.json",
    } <= set(pulled.files)


def test_s2v_takes_the_official_checkpoint_files(tmp_path: Path, small_models_dir: Path) -> None:
    spec = CATALOG["wan2.2-s2v-14b"]
    built = folder_files(small_models_dir / spec.key)
    extras = EXTRAS | {
        "wav2vec2-large-xlsr-53-english/pytorch_model.bin": b"the same weights as a pickle",
        "examples/talk.wav": b"RIFF",
    }
    repo = _repo(tmp_path, small_models_dir, spec.key, extras)

    selected = select(folder_files(repo), spec)

    # Every file the official code reads from the checkpoint folder, and nothing else.
    assert selected == built
    for name in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "google/umt5-xxl/tokenizer.json"):
        assert name in selected


@pytest.mark.parametrize("model", ["wan2.2-t2v-a14b", "wan2.2-i2v-a14b"])
def test_an_a14b_official_checkpoint_is_a_weights_key_of_its_own_with_its_files(
    tmp_path: Path, small_models_dir: Path, model: str
) -> None:
    """The group reads the official repository, the other classes the diffusers one: each has
    its own key, so pull, mirror and the node cache keep them apart."""
    spec = CATALOG[model]
    official = checkpoint_spec(spec)
    assert official.key == f"{model}-official" and official.key in weights_keys()
    assert weights_spec(official.key) == official and weights_spec(model) is spec
    assert official.hub_id == spec.official.hub_id and official.hub_id != spec.hub_id
    built = folder_files(small_models_dir / official.key)
    extras = EXTRAS | {"examples/i2v_input.JPG": b"\xff\xd8", "high_noise_model/README.md": b"#"}
    repo = _repo(tmp_path, small_models_dir, official.key, extras)

    selected = select(folder_files(repo), official)

    assert selected == built
    for name in (
        "high_noise_model/diffusion_pytorch_model.safetensors",
        "low_noise_model/config.json",
        "models_t5_umt5-xxl-enc-bf16.pth",
        "Wan2.1_VAE.pth",
    ):
        assert name in selected
    with pytest.raises(KeyError, match=f"{model}-official"):
        weights_spec("wan2.2-ti2v-5b-official")


def test_each_variant_is_a_weights_key_of_its_own_with_only_its_files(
    tmp_path: Path, small_models_dir: Path
) -> None:
    """A variant's weights are pulled, mirrored and filled as a model's are, under
    ``<model>:<variant>``: FastWan's transformer (not the rest of its repository, which is the
    model's own), a Lightning LoRA's one file, or an A14B variant's two."""
    from testkit.small_models.lora import build_checkpoint, build_lora

    spec = CATALOG["wan2.2-ti2v-5b"]
    fastwan = weights_spec("wan2.2-ti2v-5b:fastwan-3")
    assert fastwan.key == "wan2.2-ti2v-5b:fastwan-3" and fastwan.key in weights_keys()
    assert fastwan.hub_id == spec.variants["fastwan-3"].checkpoint and not fastwan.variants
    # FastWan's repository is a whole diffusers one: the model's folder with its transformer.
    repo = _repo(tmp_path, small_models_dir, spec.key, EXTRAS)
    shutil.rmtree(repo / "transformer")
    build_checkpoint(small_models_dir / spec.key, repo, seed=1)
    hub = FolderHub(repo)
    pulled = pull(fastwan, tmp_path / "fastwan", hub)
    assert pulled.files == ["transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"]

    lightning = weights_spec("qwen-image:lightning-8")
    variant = CATALOG["qwen-image"].variants["lightning-8"]
    assert lightning.hub_id == variant.lora_repo
    lora_repo = tmp_path / "lightning-repo"
    for name in (variant.lora_file, "Qwen-Image-Lightning-4steps-V1.0.safetensors", "README.md"):
        (lora_repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(
            build_lora(small_models_dir / "qwen-image", "qwen-image", tmp_path / "l.safetensors"),
            lora_repo / name,
        )
    assert select(folder_files(lora_repo), lightning) == [variant.lora_file]

    a14b = CATALOG["wan2.2-t2v-a14b"].variants["lightning-4"]
    two = weights_spec("wan2.2-t2v-a14b:lightning-4")
    listing = [
        a14b.lora_file,
        a14b.lora_file_2,
        "Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1/high_noise_model.safetensors",
    ]
    assert select(listing, two) == sorted([a14b.lora_file, a14b.lora_file_2])
    with pytest.raises(KeyError, match="qwen-image:lightning-8"):
        weights_spec("qwen-image:lightning-2")


def test_a_folder_with_several_safetensors_shards_keeps_them_all() -> None:
    spec = CATALOG["qwen-image"]
    paths = [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        *[f"transformer/diffusion_pytorch_model-0000{i}-of-00009.safetensors" for i in range(1, 10)],
        "text_encoder/model-00001-of-00004.safetensors",
        "text_encoder/pytorch_model.bin",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "vae/diffusion_pytorch_model.bin",
    ]
    selected = select(paths, spec)
    assert [p for p in paths if p not in selected] == [
        "text_encoder/pytorch_model.bin",
        "vae/diffusion_pytorch_model.bin",
    ]


def test_an_empty_selection_is_refused(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("nothing here")
    with pytest.raises(FileNotFoundError, match="none of the files"):
        pull(CATALOG["z-image-turbo"], tmp_path / "pulled", FolderHub(repo))


@pytest.mark.parametrize("path", ["../escape", "/abs", "a/../../b", "a//b", ".cache/x", "a\\b", ""])
def test_a_manifest_cannot_name_a_path_outside_the_model_folder(path: str) -> None:
    with pytest.raises(ValueError):
        check_relative(path)


def test_the_manifest_round_trips_and_names_every_file(tmp_path: Path, small_models_dir: Path) -> None:
    spec = CATALOG["z-image-turbo"]
    manifest = manifest_of(small_models_dir / spec.key, spec, commits={spec.hub_id: "abc"})
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest and manifest.commit == "abc"
    # Its files' folder in the store is named by their content: the same files, the same folder.
    assert manifest.files_at.startswith("files-")
    assert manifest_of(small_models_dir / spec.key, spec).files_at == manifest.files_at
    # A manifest written before commits and content-named folders were kept reads as it was.
    older = json.loads(manifest.to_json())
    del older["commits"], older["files_at"]
    assert Manifest.from_json(json.dumps(older)).files_at == "files"
    with pytest.raises(ValueError, match="files folder"):
        Manifest.from_json(json.dumps(older | {"files_at": "../elsewhere"}))
    assert [f.path for f in manifest.files] == folder_files(small_models_dir / spec.key)
    assert manifest.total_bytes == sum(
        (small_models_dir / spec.key / f.path).stat().st_size for f in manifest.files
    )


def test_the_official_s2v_code_refuses_a_hub_id_saying_how_to_mirror_it() -> None:
    from worker.adapters.base import Runtime
    from worker.adapters.s2v import S2VGroupModel
    from worker.group.spec import GroupPlace

    spec = CATALOG["wan2.2-s2v-14b"]
    runtime = Runtime.resolve("cpu", "float32")
    with pytest.raises(FileNotFoundError, match="python -m worker.weights pull wan2.2-s2v-14b"):
        S2VGroupModel(spec, spec.hub_id, runtime, GroupPlace(rank=0, world_size=1, local_rank=0))
    from worker.adapters.a14b import A14BGroupModel

    a14b = CATALOG["wan2.2-t2v-a14b"]
    with pytest.raises(FileNotFoundError, match="python -m worker.weights pull wan2.2-t2v-a14b-official"):
        A14BGroupModel(a14b, a14b.hub_id, runtime, GroupPlace(rank=0, world_size=1, local_rank=0))
