"""A Hugging Face hub on loopback: the part of its HTTP API that ``huggingface_hub`` uses to read a
model's metadata and download its files, over repositories held in memory.

What it answers, as the hub does:

- ``GET /api/models/{repo}/revision/{rev}``: ``model_info`` (``sha``, ``siblings``, ``gated``).
- ``GET /api/models/{repo}/tree/{rev}?recursive=...``: the recursive listing ``snapshot_download``
  reads, paginated with a ``Link: <...>; rel="next"`` header (``page_size`` entries a page, where
  the hub uses 1,000), LFS files with their ``lfs`` sha256 and size. No ``xetHash`` and no
  ``X-Xet-*`` headers: the client then downloads over plain HTTP.
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: a small (git) file is served here, with
  ``X-Repo-Commit``, ``ETag`` (its git blob id) and ``Content-Length``; an LFS file is a 302 to a
  second server on another port (the CDN), with ``X-Linked-Etag`` (its sha256) and
  ``X-Linked-Size``. A client must not send its token there.
- ``GET /blobs/{sha256}`` on the CDN: the bytes, with ``Range: bytes=N-`` answered 206 (the
  client resumes a cut download with one only past the whole 10 MB chunks it already wrote; below
  that it fetches the file again).

A gated repository answers 401 with ``X-Error-Code: GatedRepo`` to a request for its files without
the right ``Authorization: Bearer`` token (its metadata stays public, as on the hub); an unknown
repository 401 ``RepoNotFound``, an unknown revision 404 ``RevisionNotFound``. Every request is
recorded with its headers. ``cut_once``: LFS files whose first download is cut halfway (the
connection closed mid-body), as a flaky network does.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

# Files the hub keeps in LFS (as .gitattributes does for weights); the rest are git blobs.
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".onnx", ".png", ".wav")


@dataclass
class HubRepo:
    files: dict[str, bytes]
    commit: str
    branch: str = "main"
    token: str | None = None  # set: gated, files only with this token

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)


@dataclass(frozen=True)
class Seen:
    method: str
    path: str  # unquoted, without the query
    headers: dict[str, str]  # names in lower case
    server: str  # "hub" or "cdn"


def repo_from_folder(folder: Path, commit: str, **kwargs) -> HubRepo:
    files = {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }
    return HubRepo(files, commit, **kwargs)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class LocalHub:
    repos: dict[str, HubRepo]
    page_size: int = 5
    cut_once: set[str] = field(default_factory=set)
    seen: list[Seen] = field(default_factory=list)
    endpoint: str = ""
    cdn: str = ""

    def blob(self, sha256: str) -> bytes | None:
        for repo in self.repos.values():
            for data in repo.files.values():
                if hashlib.sha256(data).hexdigest() == sha256:
                    return data
        return None


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    server_name_: str
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    # -- answers

    def _answer(self, head: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.hub.seen.append(Seen(self.command, path, headers, self.server_name_))
        if self.server_name_ == "cdn":
            return self._blob(path.removeprefix("/blobs/"), head)
        if path.startswith("/api/models/"):
            rest = path.removeprefix("/api/models/")
            for marker, answer in (("/revision/", self._info), ("/tree/", self._tree)):
                if marker in rest:
                    repo_id, _, tail = rest.partition(marker)
                    return answer(repo_id, tail, parse_qs(url.query))
        if "/resolve/" in path:
            repo_id, _, tail = path.partition("/resolve/")
            revision, _, rel = tail.partition("/")
            return self._resolve(repo_id.lstrip("/"), revision, rel, head)
        self._error(404, "EntryNotFound", f"no route {path}")

    def _repo(self, repo_id: str, revision: str, files: bool) -> HubRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        if files and repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
            self._error(
                401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it."
            )
            return None
        if revision not in (repo.commit, repo.branch):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    def _info(self, repo_id: str, revision: str, query: dict) -> None:
        if (repo := self._repo(repo_id, revision, files=False)) is None:
            return
        body = {
            "_id": "0" * 24,
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.commit,
            "private": False,
            "gated": "manual" if repo.token else False,
            "disabled": False,
            "tags": ["diffusers"],
            "siblings": [{"rfilename": path} for path in sorted(repo.files)],
        }
        self._json(body, {"X-Repo-Commit": repo.commit})

    def _tree(self, repo_id: str, tail: str, query: dict) -> None:
        revision, _, under = tail.partition("/")
        if (repo := self._repo(repo_id, revision, files=False)) is None:
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries = self._entries(repo, under, recursive)
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start : start + self.hub.page_size]
        extra = {}
        if start + self.hub.page_size < len(entries):
            next_query = f"recursive={str(recursive).lower()}&cursor={start + self.hub.page_size}"
            next_url = f"{self.hub.endpoint}/api/models/{repo_id}/tree/{quote(revision, safe='')}"
            extra["Link"] = f'<{next_url}{"/" + quote(under) if under else ""}?{next_query}>; rel="next"'
        self._json(page, extra)

    def _entries(self, repo: HubRepo, under: str, recursive: bool) -> list[dict]:
        prefix = f"{under}/" if under else ""
        folders: set[str] = set()
        entries = []
        for path, data in sorted(repo.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                folders.add(prefix + "/".join(parts[:depth]))
            if len(parts) > 1 and not recursive:
                continue
            entry: dict = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
            if repo.is_lfs(path):
                pointer = b"version https://git-lfs.github.com/spec/v1\n"
                entry["lfs"] = {
                    "oid": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "pointerSize": len(pointer) + 80,
                }
            entries.append(entry)
        listed = folders if recursive else {f for f in folders if "/" not in f[len(prefix) :]}
        oid = git_blob_id(b"tree")
        entries += [{"type": "directory", "path": f, "oid": oid, "size": 0} for f in sorted(listed)]
        return entries

    def _resolve(self, repo_id: str, revision: str, rel: str, head: bool) -> None:
        if (repo := self._repo(repo_id, revision, files=True)) is None:
            return
        data = repo.files.get(rel)
        if data is None:
            self._error(404, "EntryNotFound", f"{rel} does not exist on {revision}", commit=repo.commit)
            return
        if repo.is_lfs(rel):
            sha256 = hashlib.sha256(data).hexdigest()
            self.send_response(302)
            self.send_header("Location", f"{self.hub.cdn}/blobs/{sha256}")
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("X-Linked-Etag", f'"{sha256}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("ETag", f'"{git_blob_id(data)}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{git_blob_id(data)}"')
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _blob(self, sha256: str, head: bool) -> None:
        data = self.hub.blob(sha256)
        if data is None:
            self._error(404, "EntryNotFound", "no such blob")
            return
        start = 0
        range_ = self.headers.get("Range", "")
        if range_.startswith("bytes=") and range_.endswith("-"):
            start = int(range_.removeprefix("bytes=").removesuffix("-"))
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{sha256}"')
        self.end_headers()
        if head:
            return
        if sha256 in self.hub.cut_once and not start:
            self.hub.cut_once.discard(sha256)
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def _json(self, body: object, extra: dict[str, str]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        raw = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)


@contextmanager
def serve_hub(hub: LocalHub) -> Iterator[LocalHub]:
    """Serve ``hub`` on loopback (``hub.endpoint``, and its CDN at ``hub.cdn``) until the block ends."""
    servers = []
    for name in ("hub", "cdn"):
        handler = type(f"{name.title()}Handler", (_Handler,), {"hub": hub, "server_name_": name})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    hub.endpoint, hub.cdn = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    try:
        yield hub
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
