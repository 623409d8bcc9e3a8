"""A hub mirror on loopback, for `weights pull` from a hub id: the routes of the Hugging Face hub's HTTP API
that huggingface_hub reads to download a model, serving one directory as one commit of one repository.
`HF_ENDPOINT` points at it as at a company's mirror. The shapes are the hub's, as huggingface_hub 2.5 parses
them: `/api/models/{repo}[/revision/{rev}]` (hf_api.model_info: `sha`, `siblings` with `lfs.sha256`),
`/api/models/{repo}/tree/{rev}` (hf_api.list_repo_tree: `oid`, `lfs.oid`), and `/{repo}/resolve/{rev}/{path}`
(file_download.get_hf_file_metadata: `X-Repo-Commit`, `X-Linked-Etag`, `X-Linked-Size`); errors carry the
hub's `X-Error-Code`. `corrupt` serves other bytes for one file than the sha256 the API lists (a bad mirror)."""

from __future__ import annotations

import hashlib
import json
import threading
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class HubMirror:
    def __init__(self, repo_id: str, folder: Path, *, token: str | None = None, corrupt: str | None = None,
                 lfs: tuple[str, ...] = ("*.safetensors", "*.bin")):
        self.repo_id, self.folder, self.token, self.corrupt = repo_id, folder, token, corrupt
        self.files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        self.lfs = {f for f in self.files if any(fnmatch(f, pattern) for pattern in lfs)}
        self.commit = hashlib.sha1("".join(self.files).encode() + b"".join(
            (folder / f).read_bytes() for f in self.files)).hexdigest()
        self.asked: list[tuple[str, str, str]] = []  # each request's method, path and Authorization header
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> HubMirror:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def entry(self, path: str) -> dict:
        data = (self.folder / path).read_bytes()
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id
        lfs = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        return {"path": path, "size": len(data), "blob": blob, "lfs": lfs if path in self.lfs else None}

    def body(self, path: str) -> bytes:
        data = (self.folder / path).read_bytes()
        return data[:-1] + bytes([data[-1] ^ 0xFF]) if path == self.corrupt else data

    def _handler(self):
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self.answer(head=True)

            def do_GET(self) -> None:
                self.answer(head=False)

            def fail(self, code: int, error: str) -> None:
                self.send_response(code)
                self.send_header("X-Error-Code", error)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def send(self, status: int, data: bytes, headers: dict, head: bool) -> None:
                self.send_response(status)
                for name, value in {"Content-Length": str(len(data)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def answer(self, head: bool) -> None:
                mirror.asked.append((self.command, self.path, self.headers.get("Authorization", "")))
                if mirror.token and self.headers.get("Authorization") != f"Bearer {mirror.token}":
                    return self.fail(401, "GatedRepo")
                path = unquote(urlsplit(self.path).path)
                api, repo = f"/api/models/{mirror.repo_id}", f"/{mirror.repo_id}/resolve/"
                if path in (api, f"{api}/revision/main", f"{api}/revision/{mirror.commit}"):
                    siblings = [{"rfilename": e["path"], "size": e["size"], "blobId": e["blob"], "lfs": e["lfs"]}
                                for e in map(mirror.entry, mirror.files)]
                    return self.send(200, json.dumps({"id": mirror.repo_id, "sha": mirror.commit,
                                                      "siblings": siblings}).encode(),
                                     {"Content-Type": "application/json"}, head)
                if path in (f"{api}/tree/main", f"{api}/tree/{mirror.commit}"):
                    tree = [{"type": "file", "path": e["path"], "size": e["size"], "oid": e["blob"]}
                            | ({"lfs": {"oid": e["lfs"]["sha256"], "size": e["size"], "pointerSize": 134}}
                               if e["lfs"] else {}) for e in map(mirror.entry, mirror.files)]
                    return self.send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head)
                if path.startswith(repo):
                    revision, _, name = path[len(repo):].partition("/")
                    if revision not in ("main", mirror.commit):
                        return self.fail(404, "RevisionNotFound")
                    if name not in mirror.files:
                        return self.fail(404, "EntryNotFound")
                    e = mirror.entry(name)
                    etag = e["lfs"]["sha256"] if e["lfs"] else e["blob"]
                    return self.send(200, mirror.body(name), {
                        "X-Repo-Commit": mirror.commit, "ETag": f'"{etag}"', "X-Linked-Etag": f'"{etag}"',
                        "X-Linked-Size": str(e["size"])}, head)
                if path.startswith("/api/models/"):
                    return self.fail(404, "RevisionNotFound" if path.startswith(api) else "RepoNotFound")
                return self.fail(404, "RepoNotFound")

        return Handler
