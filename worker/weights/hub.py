"""``pull``: a model's files from the Hugging Face hub, at the catalog's revision, into a folder.

The hub is reached only here, through ``Hub``: ``HuggingFaceHub`` lists a revision's files and
downloads the chosen ones with ``huggingface_hub`` (``HF_TOKEN`` for gated or private
repositories; ``HF_ENDPOINT`` for a mirror of the hub) and turns the hub's refusals into a
``HubError`` that says what to do. Workers never call it: they fill their
node cache from the object store, which ``mirror`` fills from a pulled folder.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from routing.catalog import ModelSpec
from worker.weights.files import select

log = logging.getLogger(__name__)

# Written into a pulled folder: the repository, the revision asked for and the commit it was.
PULLED_FILE = Path(".fleet") / "pulled.json"


class Hub(Protocol):
    def list_files(self, repo_id: str, revision: str) -> tuple[str, list[str]]:
        """The commit ``revision`` names, and every file path of the repository at it."""
        ...

    def download(self, repo_id: str, commit: str, files: list[str], folder: Path) -> None:
        """``files`` of ``repo_id`` at ``commit`` into ``folder``, at their relative paths."""
        ...


class HubError(Exception):
    """The hub refused or failed a request; the message says which repository and what to do."""


class HuggingFaceHub:
    def __init__(self, token: str | None = None):
        self.token = token if token is not None else os.environ.get("HF_TOKEN")

    def list_files(self, repo_id: str, revision: str) -> tuple[str, list[str]]:
        from huggingface_hub import HfApi

        with self._errors(repo_id, revision):
            info = HfApi(token=self.token).model_info(repo_id, revision=revision)
        return str(info.sha), [sibling.rfilename for sibling in info.siblings or []]

    def download(self, repo_id: str, commit: str, files: list[str], folder: Path) -> None:
        from huggingface_hub import snapshot_download

        # allow_patterns are fnmatch patterns: escaped, each matches only the file it names.
        with self._errors(repo_id, commit):
            snapshot_download(
                repo_id,
                revision=commit,
                allow_patterns=[glob.escape(rel) for rel in files],
                local_dir=folder,
                token=self.token,
            )

    @contextmanager
    def _errors(self, repo_id: str, revision: str) -> Iterator[None]:
        """``huggingface_hub``'s errors, as a ``HubError`` that says what to do about them."""
        from huggingface_hub import constants
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = f"{repo_id} on {constants.ENDPOINT}"
        try:
            yield
        except RevisionNotFoundError as e:
            raise HubError(f"{where} has no revision {revision}") from e
        except (GatedRepoError, RepositoryNotFoundError) as e:
            if self.token:
                fix = "the token in HF_TOKEN has no access to it: accept its terms with that account"
            else:
                fix = "set HF_TOKEN to a token of an account that has access"
            kind = "gated" if isinstance(e, GatedRepoError) else "private or missing"
            raise HubError(f"{where} refused access ({kind}): {fix}") from e
        except HfHubHTTPError as e:
            raise HubError(f"{where} failed: {str(e).splitlines()[0]}") from e
        except LocalEntryNotFoundError as e:
            raise HubError(f"{where} could not be reached (HF_ENDPOINT names the hub): {e}") from e


@dataclass(frozen=True)
class Pulled:
    folder: Path
    commit: str
    files: list[str]


def pull(spec: ModelSpec, folder: Path, hub: Hub) -> Pulled:
    """The files ``spec``'s pipeline loads, at its catalog revision, into ``folder``."""
    commit, paths = hub.list_files(spec.hub_id, spec.revision)
    files = select(paths, spec)
    if not files:
        raise FileNotFoundError(f"{spec.hub_id}@{spec.revision} has none of the files {spec.key} loads")
    log.info("%s: pulling %d of %d files of %s at %s", spec.key, len(files), len(paths), spec.hub_id, commit)
    folder.mkdir(parents=True, exist_ok=True)
    hub.download(spec.hub_id, commit, files, folder)
    missing = [rel for rel in files if not (folder / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"{spec.key}: the download left out {', '.join(missing)}")
    record = {"hub_id": spec.hub_id, "revision": spec.revision, "commit": commit}
    (folder / PULLED_FILE).parent.mkdir(exist_ok=True)
    (folder / PULLED_FILE).write_text(json.dumps(record, indent=1))
    return Pulled(folder, commit, files)


def pulled_commit(folder: Path) -> str | None:
    """The commit a pulled ``folder`` came from, if ``pull`` made it."""
    try:
        return json.loads((folder / PULLED_FILE).read_text())["commit"]
    except (FileNotFoundError, KeyError, ValueError):
        return None
