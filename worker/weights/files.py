"""Which files of a model's repository the fleet keeps, and the manifest that names them.

A diffusers repository is a folder per component: each one's config, its safetensors (sharded
ones with their index), and the tokenizer and processor files; the scheduler is a config. S2V's
official checkpoint is the layout ``wan.WanS2V`` reads (``testkit/small_models/s2v.py`` draws
it): the DiT's safetensors, the T5 and VAE ``.pth`` state dicts, and the T5 tokenizer and wav2vec2
folders; an A14B official checkpoint (``routing.catalog.checkpoint_spec``) has the two experts'
DiTs in ``high_noise_model/`` and ``low_noise_model/`` beside the same T5 and VAE files. Anything
else a repository carries (sample images, READMEs, other formats of the same weights) is left on
the hub. A model whose catalog entry names files of other repositories (``ModelSpec.extra_files``:
Animate's ``process_checkpoint``) takes those that its patterns match.

The manifest is what the object store's mirror promises: every file's path relative to the
model's folder, its size and its sha256, and the commit of every repository they came from. A
node's copy is right when every file matches it. The files are stored in a folder named by
their content (``files_folder``), so a mirror replaced by other files leaves the ones its old
manifest names where they were, for fills still reading them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from routing.catalog import HubFiles, ModelSpec

# Matched as the hub matches allow_patterns (fnmatch: "*" crosses "/"), against paths relative to
# the repository's root.
DIFFUSERS_FILES = (
    "model_index.json",
    "*/*.json",  # configs, safetensors indexes, tokenizer and processor files
    "*/*.safetensors",
    "*/*.txt",  # BPE merges
    "*/*.model",  # sentencepiece tokenizers (T5)
    "*/*.jinja",  # chat templates
)
OFFICIAL_FILES = (
    "*.json",  # the DiTs' configs and safetensors indexes
    "diffusion_pytorch_model*.safetensors",
    "high_noise_model/diffusion_pytorch_model*.safetensors",  # A14B's two experts
    "low_noise_model/diffusion_pytorch_model*.safetensors",
    "models_t5_umt5-xxl-enc-bf16.pth",
    "Wan2.1_VAE.pth",
    "google/umt5-xxl/*",
    "wav2vec2-large-xlsr-53-english/*",  # S2V's speech encoder
)
# Other formats of weights: a folder that has its weights as safetensors needs none of these
# (diffusers and transformers read the safetensors when both are there).
_REDUNDANT_BESIDE_SAFETENSORS = ("*.bin", "*.pt", "*.msgpack", "*.h5", "*.onnx")


def patterns(spec: ModelSpec) -> tuple[str, ...]:
    """The repository files ``spec``'s pipeline loads, as hub allow-patterns (a variant's weights:
    its own files, ``ModelSpec.weights_files``)."""
    if spec.weights_files:
        return spec.weights_files
    return OFFICIAL_FILES if spec.pipeline.startswith("wan.") else DIFFUSERS_FILES


def select(paths: Iterable[str], spec: ModelSpec) -> list[str]:
    """Of a repository's file ``paths``, those to download for ``spec``, sorted: the ones its
    patterns match, less other formats of weights a folder also has as safetensors."""
    wanted = [p for p in paths if any(fnmatch.fnmatch(p, pattern) for pattern in patterns(spec))]
    with_safetensors = {str(PurePosixPath(p).parent) for p in wanted if p.endswith(".safetensors")}
    return sorted(
        p
        for p in wanted
        if not (
            str(PurePosixPath(p).parent) in with_safetensors
            and any(fnmatch.fnmatch(PurePosixPath(p).name, r) for r in _REDUNDANT_BESIDE_SAFETENSORS)
        )
    )


def select_extra(paths: Iterable[str], extra: HubFiles) -> list[str]:
    """Of another repository's file ``paths``, those ``extra`` names, sorted."""
    return sorted(p for p in paths if any(fnmatch.fnmatch(p, pattern) for pattern in extra.patterns))


# A full commit id: a revision that pins (a branch or tag name moves).
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_commit(revision: str) -> bool:
    return bool(_COMMIT.match(revision))


def sources(spec: ModelSpec) -> list[tuple[str, str]]:
    """Every repository ``spec``'s folder holds files of, with the revision the catalog names:
    the model's own first."""
    return [(spec.hub_id, spec.revision), *((extra.hub_id, extra.revision) for extra in spec.extra_files)]


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the model's folder, "/"-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    model: str
    hub_id: str
    revision: str  # the catalog's revision: names the mirror's folder
    files: tuple[FileEntry, ...]
    # The hub commit the files came from, when the pull recorded it.
    commit: str | None = None
    # Every repository's commit, the model's own and its extra files' (by hub id), as recorded.
    commits: dict[str, str] = field(default_factory=dict)
    # The folder of the mirror its files are in (``files_folder``); "files" in mirrors made
    # before folders were named by content.
    files_at: str = "files"

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        data = json.loads(text)
        files = tuple(FileEntry(**entry) for entry in data.pop("files"))
        for entry in files:
            check_relative(entry.path)
        if not _FILES_AT.match(data.get("files_at", "files")):
            raise ValueError(f"not a mirror's files folder: {data['files_at']!r}")
        return cls(files=files, **data)

    def describe(self) -> str:
        """Its commits (or that none was recorded), and its files' count and size."""
        commits = ", ".join(f"{hub_id}@{commit}" for hub_id, commit in sorted(self.commits.items()))
        return f"{commits or 'no recorded commit'}; {len(self.files)} files, {self.total_bytes / 1e9:.2f} GB"


_FILES_AT = re.compile(r"^files(-[0-9a-f]{16})?$")


def files_folder(entries: Iterable[FileEntry]) -> str:
    """The mirror's folder for these files: named by their paths, sizes and hashes."""
    digest = hashlib.sha256()
    for entry in sorted(entries, key=lambda e: e.path):
        digest.update(f"{entry.path}\0{entry.size}\0{entry.sha256}\n".encode())
    return f"files-{digest.hexdigest()[:16]}"


def check_relative(path: str) -> str:
    """``path`` if it stays inside the folder it is relative to; ValueError otherwise (a
    manifest is read from a store, and must not write outside the node's cache)."""
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or "\x00" in path or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a relative file path: {path!r}")
    if any(p.startswith(".") for p in parts):
        raise ValueError(f"hidden paths are not weights: {path!r}")
    return path


def folder_files(folder: Path) -> list[str]:
    """Every file under ``folder``, relative and sorted, leaving out hidden files and folders
    (the hub client's ``.cache``, the node cache's own bookkeeping)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(folder)
        found += [(rel / name).as_posix() for name in filenames if not name.startswith(".")]
    return sorted(found)


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_of(folder: Path, spec: ModelSpec, commits: dict[str, str] | None = None) -> Manifest:
    """The manifest of the model folder ``folder`` holds (every file, hashed); ``commits``: the
    repositories' commits its files came from, by hub id."""
    entries = tuple(
        FileEntry(rel, (folder / rel).stat().st_size, sha256_of(folder / rel)) for rel in folder_files(folder)
    )
    if not entries:
        raise FileNotFoundError(f"{folder} holds no files")
    commits = dict(commits or {})
    return Manifest(
        spec.key,
        spec.hub_id,
        spec.revision,
        entries,
        commit=commits.get(spec.hub_id),
        commits=commits,
        files_at=files_folder(entries),
    )


def store_prefix(spec: ModelSpec) -> str:
    """Where the model's mirror lives in the object store."""
    return f"weights/{spec.key}/{spec.revision}/"


def manifest_key(spec: ModelSpec) -> str:
    return store_prefix(spec) + "manifest.json"


def file_key(spec: ModelSpec, manifest: Manifest, rel: str) -> str:
    """Where the mirror ``manifest`` describes keeps the file at ``rel``."""
    return store_prefix(spec) + manifest.files_at + "/" + check_relative(rel)
