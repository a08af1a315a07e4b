"""r2lm-push, tested up to the network boundary: the real huggingface_hub client talks to a fake Hub on 127.0.0.1."""

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import REPO


TOKEN = "hf_fake_token_that_must_never_be_printed"
REPO_ID = "someone/tiny-r2lm"


class FakeHub(ThreadingHTTPServer):
    """Answers the endpoints `create_repo`, `create_branch` and `upload_folder` use, and records every request.

    Every file is declared a "regular" (non-LFS) upload in the preupload answer, so the files travel base64-encoded in
    the NDJSON commit payload, where the test can read them. `status` set to 401 makes it refuse everything.
    """

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.requests = []
        self.status = 200

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeHubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        self._answer(self._record(b""), None)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer(self._record(body), body)

    def _record(self, body):
        request = {"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
        self.server.requests.append(request)
        return request

    def _answer(self, request, body):
        path = request["path"].split("?")[0]
        if self.server.status != 200:
            return self._json({"error": "Invalid credentials"}, self.server.status)
        if path == "/api/repos/create":
            return self._json({"url": f"{self.server.url}/{REPO_ID}", "name": REPO_ID})
        if path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        if "/branch/" in path:
            return self._json({})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._json(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if "/commit/" in path:
            return self._json({"commitUrl": f"{self.server.url}/{REPO_ID}/commit/{'a' * 40}", "commitOid": "a" * 40})
        return self._json({"error": f"unknown route {path}"}, 404)

    def _json(self, payload, status=200):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def hub():
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def folder(tiny_r2lm, tmp_path):
    """A private copy of the converted tiny model (pushing may point its card at the repo)."""
    return shutil.copytree(tiny_r2lm.folder, tmp_path / "tiny-r2lm")


def push(hub, tmp_path, *args, **env):
    """Runs `python -m convert.push_to_hub *args` against `hub`, with a clean Hugging Face home and `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    base.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1")
    base.update(env)
    return subprocess.run(
        [sys.executable, "-m", "convert.push_to_hub", *map(str, args)],
        cwd=REPO, env=base, capture_output=True, text=True, timeout=300,
    )


def committed_files(hub) -> dict[str, bytes]:
    """path -> content of every file in the NDJSON commit payloads the fake Hub received."""
    files = {}
    for request in hub.requests:
        if "/commit/" in request["path"]:
            for line in request["body"].splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
    return files


def test_push_creates_the_repo_and_uploads_every_file(hub, folder, tmp_path):
    result = push(hub, tmp_path, folder, REPO_ID, "--private", "--revision", "dev", HF_TOKEN=TOKEN)
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)

    create = [r for r in hub.requests if r["path"] == "/api/repos/create"]
    assert len(create) == 1
    assert json.loads(create[0]["body"]) == {"name": "tiny-r2lm", "organization": "someone", "visibility": "private"}
    assert any(r["path"] == f"/api/models/{REPO_ID}/branch/dev" for r in hub.requests)
    commits = [r for r in hub.requests if r["path"].startswith(f"/api/models/{REPO_ID}/commit/dev")]
    assert commits, [r["path"] for r in hub.requests]

    local = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert committed_files(hub) == local  # every file, byte for byte, and nothing else
    header = json.loads(commits[0]["body"].splitlines()[0])["value"]
    settings = json.loads(local["r2lm_conversion.json"])
    assert header["summary"].startswith(f"R2LM conversion of {settings['source']} (block_size=8, sidecar_layers=[3]")
    assert f'model_id = "{REPO_ID}"'.encode() in local["README.md"]  # the card now loads the repo
    validated = [json.loads(r["body"]) for r in hub.requests if r["path"] == "/api/validate-yaml"]
    assert [v["content"].encode() for v in validated] == [local["README.md"]]  # the card's metadata went to the Hub
    assert settings["model_id"] == REPO_ID


def test_push_offline_says_so_without_traceback(hub, folder, tmp_path):
    result = push(hub, tmp_path, folder, REPO_ID, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="1")
    assert result.returncode == 2
    assert "offline" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert "Traceback" not in result.stderr
    assert hub.requests == []


def test_push_without_a_token_says_how_to_log_in(hub, folder, tmp_path):
    result = push(hub, tmp_path, folder, REPO_ID)
    assert result.returncode == 2 and "hf auth login" in result.stderr
    assert hub.requests == []


def test_push_reports_a_rejected_token(hub, folder, tmp_path):
    hub.status = 401
    result = push(hub, tmp_path, folder, REPO_ID, HF_TOKEN=TOKEN)
    assert result.returncode == 2
    assert "refused the push" in result.stderr and "Traceback" not in result.stderr
    assert TOKEN not in result.stdout + result.stderr


def test_push_refuses_a_folder_not_made_by_the_converter(hub, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    result = push(hub, tmp_path, tmp_path / "other", REPO_ID, HF_TOKEN=TOKEN)
    assert result.returncode == 2 and "r2lm_conversion.json" in result.stderr
    assert hub.requests == []
