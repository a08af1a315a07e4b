"""r2lm-push, tested up to the network boundary: the real huggingface_hub client talks to a fake Hub on 127.0.0.1.
Folders pushed: a converted one (the session's `tiny_r2lm`), one trained from it by `python -m train` (its final folder
and a checkpoint), and an R2LM folder that records neither."""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from huggingface_hub import ModelCard

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


def test_push_to_an_unreachable_hub_says_so(folder, tmp_path):
    """huggingface_hub 2 raises httpx2's errors, which r2lm-push used to let through as a traceback."""
    with socket.socket() as sock:  # a port on which nothing listens
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    hub = type("Closed", (), {"url": closed})
    result = push(hub, tmp_path, folder, REPO_ID, HF_TOKEN=TOKEN)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"r2lm-push: error: could not reach the Hub at {closed}: ")


@pytest.mark.parametrize(
    "case, expected",
    [
        ("not_r2lm", "holds a 'qwen3' model, not an R2LM: convert a Qwen3 checkpoint first (`r2lm-convert"),
        ("training_run_folder", "holds no model (no config.json) (a training run's folder: push {folder}/final)"),
        ("missing", "FOLDER {folder} is not a folder"),
        ("corrupt_record", "r2lm_conversion.json is not valid JSON"),
    ],
)
def test_push_refuses_what_it_cannot_push_in_one_line(case, expected, hub, tiny_r2lm, tmp_path):
    folder = tmp_path / "folder"
    if case == "not_r2lm":
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    elif case == "training_run_folder":
        (folder / "final").mkdir(parents=True)
        (folder / "final" / "config.json").write_text("{}")
    elif case == "corrupt_record":
        shutil.copytree(tiny_r2lm.folder, folder)
        (folder / "r2lm_conversion.json").write_text('{"source": ')
    result = push(hub, tmp_path, folder, REPO_ID, HF_TOKEN=TOKEN)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("r2lm-push: error: ")
    assert expected.format(folder=folder) in result.stderr
    assert hub.requests == []


@pytest.fixture(scope="module")
def trained_run(tiny_r2lm, tmp_path_factory):
    """`python -m train` for 2 steps from the converted tiny model (a fine-tuning run): checkpoints and final."""
    from train.__main__ import main as train

    root = tmp_path_factory.mktemp("trained")
    (root / "data").mkdir()
    for i in range(4):
        text = "".join(f"def f{i}_{j}(x):\n    return x + {j}\n\n" for j in range(12))
        (root / "data" / f"part{i}.py").write_text(text)
    status = train([
        "--model", str(tiny_r2lm.folder), "--data", str(root / "data"), "--output-dir", str(root / "run"),
        "--max-steps", "2", "--seq-len", "16", "--batch-size", "2", "--eval-rows", "4", "--heldout-fraction", "0.5",
        "--save-every", "1", "--eval-every", "1000", "--warmup-steps", "1",
    ])
    assert status == 0
    return root / "run"


def test_push_a_trained_folder_writes_its_card_from_the_training_record(hub, trained_run, tmp_path):
    """r2lm-push used to refuse `runs/NAME/final` (no r2lm_conversion.json). The card now says where the weights
    started (the conversion's base model and license carry over), the data, the steps and the held-out metrics."""
    folder = shutil.copytree(trained_run / "final", tmp_path / "final")
    result = push(hub, tmp_path, folder, REPO_ID, HF_TOKEN=TOKEN)
    assert result.returncode == 0, result.stderr
    local = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert committed_files(hub) == local
    record = json.loads(local["r2lm_training.json"])
    assert record["model_id"] == REPO_ID and record["init"]["kind"] == "converted"
    card = ModelCard(local["README.md"].decode())
    assert card.data.base_model == "Qwen/Qwen3-0.6B" and card.data.license == "apache-2.0" and "qwen3" in card.data.tags
    assert "It starts from [`Qwen/Qwen3-0.6B`](https://huggingface.co/Qwen/Qwen3-0.6B), converted by" in card.text
    assert "| steps | 2 of 2 |" in card.text and "| data | 2 training files" in card.text
    assert f'model_id = "{REPO_ID}"' in card.text and "| next-token (AR) NLL |" in card.text
    commit = next(r for r in hub.requests if "/commit/" in r["path"])
    summary = json.loads(commit["body"].splitlines()[0])["value"]["summary"]
    assert summary == f"R2LM trained for 2 steps (diffusion objective, 2 files, {record['tokens']} tokens)"


def test_push_a_checkpoint_leaves_its_optimizer_state_local(hub, trained_run, tmp_path):
    folder = shutil.copytree(trained_run / "checkpoint-0000002", tmp_path / "checkpoint")
    result = push(hub, tmp_path, folder, REPO_ID, HF_TOKEN=TOKEN)
    assert result.returncode == 0, result.stderr
    files = committed_files(hub)
    assert set(files) == {p.name for p in folder.iterdir() if p.is_file()}  # no training_state/
    assert b"| steps | 2 of 2 |" in files["README.md"]


def test_push_a_folder_that_records_nothing_gets_a_plain_card_once(hub, tiny_r2lm, tmp_path):
    """An R2LM folder without records (saved by hand, say) gets a plain card; a card edited by hand stays as it is."""
    folder = shutil.copytree(tiny_r2lm.folder, tmp_path / "plain", ignore=shutil.ignore_patterns("r2lm_*", "README.md"))
    assert push(hub, tmp_path, folder, REPO_ID, HF_TOKEN=TOKEN).returncode == 0
    card = committed_files(hub)["README.md"].decode()
    assert "records neither a conversion" in card and f'model_id = "{REPO_ID}"' in card
    (folder / "README.md").write_text("# my own card\n")
    hub.requests.clear()
    result = push(hub, tmp_path, folder, REPO_ID, HF_TOKEN=TOKEN)
    assert result.returncode == 0 and "left as is" in result.stdout
    assert committed_files(hub)["README.md"] == b"# my own card\n"
