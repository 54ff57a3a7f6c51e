"""A small Hub-compatible HTTP server (stdlib only) for testing uploads and downloads with the real client.

It implements what ``huggingface_hub`` uses to create a repo, commit regular files, read repo info, list and
resolve files, keeps everything in memory, checks bearer tokens for writes and private repos, and can be told to fail.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1] if self.commits else "0" * 40


class HubState:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.fail_status: int | None = None  # answer every request with this status
        self.drop_commits = False  # close the connection instead of answering a commit
        self.requests: list[str] = []


class Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _authorised(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.state.token}"

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, b"" if head else body, {"X-Error-Code": code, "X-Error-Message": message}, head=head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _readable_repo(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorised()):
            self._error(401 if repo is not None else 404, "RepoNotFound", f"Repository {repo_id} not found", head)
            return None
        return repo

    def _route(self, method: str) -> None:
        self.state.requests.append(f"{method} {self.path}")
        body = self._body() if method == "POST" else b""
        if self.state.fail_status is not None:
            self._error(self.state.fail_status, "Injected", f"injected failure {self.state.fail_status}")
            return
        path = self.path.split("?")[0]
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body))
        if method == "GET" and path == "/api/whoami-v2":
            if not self._authorised():
                return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            return self._json(200, {"type": "user", "name": "me", "auth": {"accessToken": {"role": "write"}}})
        if method == "POST" and path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        if method == "POST" and parts[:2] == ["api", "models"] and len(parts) >= 5:
            repo_id, action = "/".join(parts[2:4]), parts[4]
            if action == "preupload":
                return self._preupload(repo_id, json.loads(body))
            if action == "commit":
                return self._commit(repo_id, body)
        if method == "GET" and parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
            repo = self._readable_repo("/".join(parts[2:4]))  # the file listing (snapshot_download): one page
            if repo is not None:
                tree = [
                    {"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
                    for name, content in sorted(repo.files.items())
                ]
                self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
            return None
        if method == "GET" and parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = self._readable_repo("/".join(parts[2:4]))
            if repo is not None:
                siblings = [{"rfilename": name} for name in sorted(repo.files)]
                self._json(
                    200, {"id": "/".join(parts[2:4]), "sha": repo.sha, "private": repo.private, "siblings": siblings}
                )
            return None
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), "/".join(parts[4:]), head=method == "HEAD")
        return self._error(404, "NotFound", f"no route for {method} {path}", head=method == "HEAD")

    def _create(self, payload: dict) -> None:
        if not self._authorised():
            return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        url = f"http://{self.headers['Host']}/{repo_id}"
        if repo_id in self.state.repos:  # the Hub names the existing repo in its 409 answer
            return self._json(409, {"error": "You already created this model repo", "url": url})
        self.state.repos[repo_id] = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
        return self._json(200, {"url": url})

    def _preupload(self, repo_id: str, payload: dict) -> None:
        if not self._authorised() or repo_id not in self.state.repos:
            return self._error(401, "RepoNotFound", f"Repository {repo_id} not found")
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in payload["files"]]
        return self._json(200, {"files": files})

    def _commit(self, repo_id: str, body: bytes) -> None:
        if not self._authorised() or repo_id not in self.state.repos:
            return self._error(401, "RepoNotFound", f"Repository {repo_id} not found")
        if self.state.drop_commits:
            self.close_connection = True  # the upload is cut off: no answer, nothing committed
            return None
        repo = self.state.repos[repo_id]
        staged = dict(repo.files)
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                staged[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                staged.pop(item["value"]["path"], None)
            elif item["key"] != "header":
                return self._error(400, "BadRequest", f"unsupported operation {item['key']}")
        repo.files = staged
        repo.commits.append(hashlib.sha1(body + repo.sha.encode()).hexdigest())
        url = f"http://{self.headers['Host']}/{repo_id}/commit/{repo.sha}"
        return self._json(200, {"commitUrl": url, "commitOid": repo.sha, "pullRequestUrl": None})

    def _resolve(self, repo_id: str, filename: str, head: bool) -> None:
        repo = self._readable_repo(repo_id, head)
        if repo is None:
            return
        if filename not in repo.files:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", head)
        content = repo.files[filename]
        etag = f'"{hashlib.sha256(content).hexdigest()}"'
        self._send(200, content, {"X-Repo-Commit": repo.sha, "ETag": etag}, head=head)

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")


class LocalHub:
    """``with LocalHub(token) as hub:`` serves on 127.0.0.1 at ``hub.endpoint`` until the block ends."""

    def __init__(self, token: str = "hf_local_test_token") -> None:
        self.state = HubState(token)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
