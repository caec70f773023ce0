"""``pull``: a model's files from the Hugging Face hub, at the catalog's revision, into a folder;
with them, the files its catalog entry names in other repositories (``ModelSpec.extra_files``),
each at its own revision. The folder records the commit each revision was (``PULLED_FILE``).

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
from worker.weights.files import select, select_extra

log = logging.getLogger(__name__)

# Written into a pulled folder: the repository, the revision asked for and the commit it was, and
# every repository's commit by hub id (the model's own and its extra files').
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
    def __init__(self, token: str | None = None, endpoint: str | None = None):
        """``endpoint``: the hub's address; None: ``huggingface_hub``'s (``HF_ENDPOINT``)."""
        self.token = token if token is not None else os.environ.get("HF_TOKEN")
        self.endpoint = endpoint

    def list_files(self, repo_id: str, revision: str) -> tuple[str, list[str]]:
        from huggingface_hub import HfApi

        with self._errors(repo_id, revision):
            info = HfApi(endpoint=self.endpoint, token=self.token).model_info(repo_id, revision=revision)
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
                endpoint=self.endpoint,
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

        where = f"{repo_id} on {self.endpoint or constants.ENDPOINT}"
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
    commit: str  # the model's own repository's
    files: list[str]
    commits: dict[str, str]  # every repository's, by hub id


def pull(spec: ModelSpec, folder: Path, hub: Hub) -> Pulled:
    """The files ``spec``'s pipeline loads, at its catalog revision, into ``folder``, and those
    of its extra repositories at theirs."""
    commit, paths = hub.list_files(spec.hub_id, spec.revision)
    files = select(paths, spec)
    if not files:
        raise FileNotFoundError(f"{spec.hub_id}@{spec.revision} has none of the files {spec.key} loads")
    wanted = [(spec.hub_id, commit, files, len(paths))]
    for extra in spec.extra_files:
        extra_commit, extra_paths = hub.list_files(extra.hub_id, extra.revision)
        extra_files = select_extra(extra_paths, extra)
        if not extra_files:
            raise FileNotFoundError(
                f"{extra.hub_id}@{extra.revision} has none of the files {spec.key} takes from it "
                f"({', '.join(extra.patterns)})"
            )
        both = set(extra_files) & {rel for _, _, taken, _ in wanted for rel in taken}
        if both:
            raise FileNotFoundError(
                f"{spec.key}: {extra.hub_id} and another repository both have {sorted(both)}"
            )
        wanted.append((extra.hub_id, extra_commit, extra_files, len(extra_paths)))
    folder.mkdir(parents=True, exist_ok=True)
    for hub_id, at, taken, listed in wanted:
        log.info("%s: pulling %d of %d files of %s at %s", spec.key, len(taken), listed, hub_id, at)
        hub.download(hub_id, at, taken, folder)
    everything = sorted(rel for _, _, taken, _ in wanted for rel in taken)
    missing = [rel for rel in everything if not (folder / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"{spec.key}: the download left out {', '.join(missing)}")
    commits = {hub_id: at for hub_id, at, _, _ in wanted}
    record = {"hub_id": spec.hub_id, "revision": spec.revision, "commit": commit, "commits": commits}
    (folder / PULLED_FILE).parent.mkdir(exist_ok=True)
    (folder / PULLED_FILE).write_text(json.dumps(record, indent=1))
    return Pulled(folder, commit, everything, commits)


def pulled_commits(folder: Path) -> dict[str, str]:
    """The commit of every repository a pulled ``folder``'s files came from, by hub id; empty
    when ``pull`` did not make it."""
    try:
        record = json.loads((folder / PULLED_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    if not isinstance(record, dict) or "commit" not in record:
        return {}
    return dict(record.get("commits") or {record["hub_id"]: record["commit"]})


def pulled_commit(folder: Path) -> str | None:
    """The commit of the model's own repository a pulled ``folder`` came from, if ``pull`` made it."""
    try:
        return json.loads((folder / PULLED_FILE).read_text())["commit"]
    except (FileNotFoundError, KeyError, ValueError):
        return None
