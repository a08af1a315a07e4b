"""The Space (space/app.py): its API through gradio_client on localhost, its page in headless Chromium, and the
README's command `python space/app.py`. The model is the session's tiny random R2LM (`tiny_r2lm` in conftest.py):
its text is gibberish, so the tests check the plumbing (text, statistics, streaming, error messages), not quality."""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from gradio

import gradio as gr  # noqa: E402
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from r2lm import R2LMConfig, R2LMForDiffusionLM  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
APP_FILE = REPO / "space" / "app.py"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "def add(a, b):\n"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # tiny models: threads only spin
SETTINGS = (24, 8, 0.9, "confidence", 0.0)  # max new tokens, block size, threshold, unmasking rule, temperature


def load_app_module():
    """space/app.py as a module (space/ is a Space folder, not a package)."""
    spec = importlib.util.spec_from_file_location("r2lm_space_app", APP_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app():
    return load_app_module()


@pytest.fixture(scope="module")
def served(app, tiny_r2lm, tmp_path_factory):
    """The page for the tiny model, launched on a free localhost port; yields its URL.

    The model is loaded with the library's class (not remote code, which would write to the user's HF cache);
    `test_readme_command_serves_the_page` covers the app's own `from_pretrained(trust_remote_code=True)` path.
    Torch runs on one thread: several threads on a shared 2-core machine make tiny matmuls ~15x slower.
    """
    folder = tiny_r2lm.folder
    model = R2LMForDiffusionLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, config=R2LMConfig.from_pretrained(folder))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        patch.setenv("HF_HUB_OFFLINE", "1")
        demo = app.build_demo(model, tokenizer).queue(max_size=app.QUEUE_SIZE)
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            demo.close()
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(served):
    return Client(served, verbose=False)


def test_decode_returns_text_and_stats(client, app):
    canvas, text, stats = client.predict(PROMPT, *SETTINGS, api_name="/decode")
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert "forward passes" in stats and "tokens/s" in stats
    labels = {span["class_or_confidence"] for span in canvas}
    assert labels and "mask" not in labels and labels <= set(app.COLOR_MAP)


def test_decode_streams_the_canvas_step_by_step(client, app, monkeypatch):
    """Intermediate updates show masks (the glyph) that later updates fill; the last one has none."""
    monkeypatch.setattr(app, "FRAME_S", 0.0)  # every step goes to the page, however fast the model is
    job = client.submit(PROMPT, *SETTINGS, api_name="/decode")
    job.result()
    canvases = [output[0] for output in job.outputs() if output[0]]
    masks = [sum(span["class_or_confidence"] == "mask" for span in canvas) for canvas in canvases]
    assert len(canvases) >= 2 and masks[0] > 0 and masks[-1] == 0
    assert masks == sorted(masks, reverse=True)
    first = next(canvas for canvas in canvases if masks[canvases.index(canvas)] > 0)
    assert any(span["token"] == app.MASK_GLYPH for span in first)


def test_race_shows_both_lanes_and_the_speedup(client):
    ar, parallel, summary = client.predict(PROMPT, *SETTINGS, api_name="/race")
    assert ar and parallel
    assert "Speedup:" in summary and "block size 1" in summary and f"block size {SETTINGS[1]}" in summary


def test_too_long_prompt_shows_the_error_message(client, app):
    with pytest.raises(AppError, match=f"prompt is too long.*limit is {app.MAX_PROMPT_TOKENS}"):
        client.predict("x = 1\n" * 400, *SETTINGS, api_name="/decode")


def test_max_new_tokens_over_the_cap_shows_the_error_message(client, app):
    with pytest.raises(AppError, match=f"maximum value {app.MAX_NEW_TOKENS}"):
        client.predict(PROMPT, app.MAX_NEW_TOKENS + 1, *SETTINGS[1:], api_name="/decode")


def test_an_error_inside_generate_shows_its_message(client):
    """The library refuses a prompt holding the mask token; the page shows its message (no stack trace)."""
    with pytest.raises(AppError, match="contains the mask token"):
        client.predict(PROMPT + "<|mask|>", *SETTINGS, api_name="/decode")


def test_closing_the_stream_stops_the_decoding(app):
    """When the page stops listening, the stopping criterion the app passes to `generate` turns true, so the decoding
    thread ends instead of running on (checked with a stand-in model that steps until its criteria say stop)."""

    class Stepper:
        def __init__(self):
            self.steps, self.finished = 0, threading.Event()

        def generate(self, prompt_ids, step_callback, stopping_criteria, **kwargs):
            canvas = torch.zeros(1, prompt_ids.shape[1] + 4, dtype=torch.long)
            while not stopping_criteria[0](canvas, None).all() and self.steps < 10_000:
                self.steps += 1
                step_callback(self.steps, canvas, None)
                time.sleep(0.001)
            self.finished.set()

    model = Stepper()
    stream = app.stream_generate(model, torch.ones(1, 3, dtype=torch.long), {"max_new_tokens": 4})
    assert next(stream)[0] == "steps"
    stream.close()
    assert model.finished.wait(timeout=10) and model.steps < 10_000


def test_settings_default_to_the_models_generation_config_and_examples_pass_the_checks(app, tiny_r2lm):
    """The page opens on the model's own decoding settings (the default model's are chosen by measurement), and
    every example is a request the page accepts."""
    model = R2LMForDiffusionLM.from_pretrained(tiny_r2lm.folder)
    model.generation_config.update(block_size=4, threshold=0.7, unmasking="left_to_right")
    assert [box.value for box in app.build_inputs(model)[2:5]] == [4, 0.7, "left_to_right"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_r2lm.folder, config=model.config)
    decoder = app.Decoder(model, tokenizer)
    for example in app.EXAMPLES:
        assert decoder.check(*example).shape[0] == 1


def test_caps_are_checked_before_any_decoding(app):
    """The listener checks its inputs itself, whatever the components let through (the model is never called)."""
    decoder = app.Decoder.__new__(app.Decoder)  # no model: a check that reached it would fail differently
    with pytest.raises(gr.Error, match=f"from 1 to {app.MAX_NEW_TOKENS}"):
        next(decoder.decode(PROMPT, app.MAX_NEW_TOKENS + 1, *SETTINGS[1:]))
    with pytest.raises(gr.Error, match="Enter a prompt"):
        next(decoder.decode("  ", *SETTINGS))


def test_canvas_view_labels_tokens_by_the_step_that_committed_them(app):
    """Mask id 9, EOS id 0. Step 1 commits columns 0 and 2, step 2 column 1, step 3 columns 3 (EOS) and 4, step 9
    nothing: the view shows [a (colour c1), b (c2), c (c1)] and nothing from the EOS on; before step 2, column 1 is
    the mask glyph. Colours cycle with the palette's 8 entries, so step 9 would be c1 again."""

    class Letters:
        def decode(self, ids):
            return "".join("?abcdefgh"[i] for i in ids)

    view = app.CanvasView(Letters(), n_columns=5, mask_id=9, eos_ids={0})
    view.update(1, [1, 9, 3, 9, 9])
    assert view.spans() == [("a", "c1"), (app.MASK_GLYPH, "mask"), ("c", "c1"),
                            (app.MASK_GLYPH, "mask"), (app.MASK_GLYPH, "mask")]
    view.update(2, [1, 2, 3, 9, 9])
    view.update(3, [1, 2, 3, 0, 5])
    assert view.spans() == [("a", "c1"), ("b", "c2"), ("c", "c1")]
    view.update(9, [1, 2, 3, 0, 5])
    assert view.spans() == [("a", "c1"), ("b", "c2"), ("c", "c1")] and view.step == 9
    newline = app.CanvasView(Letters(), n_columns=1, mask_id=9, eos_ids={0})
    newline.tokenizer.decode = lambda ids: "\n"
    newline.update(1, [1])
    assert newline.spans() == [("↵\n", "c1")]  # a newline stays visible, then breaks the line
    assert view.committed() == (4, [1, 2, 3, 0])


def test_model_path_comes_from_the_environment_else_the_default_folders(app, monkeypatch):
    monkeypatch.setenv("R2LM_MODEL", "someone/some-r2lm")
    assert app.default_model_path() == "someone/some-r2lm"
    monkeypatch.delenv("R2LM_MODEL")
    default = REPO / "models" / "r2lm-tiny-pycode"
    if default.is_dir() and not (REPO / "space" / "r2lm-tiny-pycode").is_dir():
        assert app.default_model_path() == str(default)  # the README's command serves the built-in default model
    monkeypatch.setattr(app, "DEFAULT_MODEL_DIRS", (Path("/nonexistent/r2lm-tiny-pycode"),))
    with pytest.raises(app.ModelError, match="set R2LM_MODEL"):
        app.default_model_path()


def test_a_model_that_is_not_r2lm_is_refused_before_its_weights_load(app, tiny_qwen3):
    """R2LM_MODEL at a Qwen3 folder used to end in `AttributeError: 'Qwen3Config' object has no attribute
    'mask_token_id'`."""
    with pytest.raises(app.ModelError, match=r"is a 'qwen3' model, not an R2LM: convert it first \(`r2lm-convert "):
        app.load_model(str(tiny_qwen3))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_folder", "R2LM_MODEL={model}: no such folder (nor a Hub id): set it to an R2LM model's folder"),
        ("training_run_folder", "(a training run's folder: set R2LM_MODEL={model}/final)"),
        ("a_file", "R2LM_MODEL={model} is a file: set it to the folder that holds the model"),
    ],
)
def test_the_command_names_a_model_it_cannot_serve_in_one_line(case, expected, app, tmp_path, monkeypatch, capsys):
    """A missing folder used to give transformers' message about repo ids, and exit status 1."""
    model = tmp_path / "model"
    if case == "training_run_folder":
        (model / "final").mkdir(parents=True)
        (model / "final" / "config.json").write_text("{}")
    elif case == "a_file":
        model.write_text("")
    monkeypatch.setenv("R2LM_MODEL", str(model))
    with pytest.raises(SystemExit) as exited:
        app.main()
    errors = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in errors
    assert errors.strip() == "space/app.py: error: " + errors.strip().removeprefix("space/app.py: error: ")
    assert len(errors.strip().splitlines()) == 1 and expected.format(model=model) in errors


def test_page_decodes_in_a_browser(served, tmp_path):
    """Headless Chromium: open the page, submit a prompt, wait for the final statistics, check the text."""
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (`apt-get install chromium`; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[test]')")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(served, wait_until="load")
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#decode").click()
            sync_api.expect(page.locator("#stats")).to_contain_text("tokens per forward", timeout=60_000)
            sync_api.expect(page.locator("#text")).to_contain_text("def add(a, b):")
            canvas = page.locator("#canvas").inner_text()
            assert canvas.strip() and "▒" not in canvas  # decoding finished: no mask left
            page.screenshot(path=tmp_path / "space.png", full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "space.png").stat().st_size > 10_000


def test_readme_command_serves_the_page(tiny_r2lm, tmp_path):
    """`python space/app.py` with R2LM_MODEL, offline, on GRADIO_SERVER_PORT: loads the model through
    `AutoModelForCausalLM.from_pretrained(trust_remote_code=True)` and answers a prompt."""
    port = free_port()
    env = {**os.environ, **ONE_THREAD, "R2LM_MODEL": str(tiny_r2lm.folder), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home"), "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
           "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)}
    log = open(tmp_path / "app.log", "w")
    process = subprocess.Popen([sys.executable, str(APP_FILE)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = wait_for_client(f"http://127.0.0.1:{port}/", process, timeout=120)
        assert client is not None, f"the app did not start:\n{(tmp_path / 'app.log').read_text()[-3000:]}"
        _, text, stats = client.predict(PROMPT, *SETTINGS, api_name="/decode")
        assert text.startswith(PROMPT) and "forward passes" in stats
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def wait_for_client(url, process, timeout):
    """A client for `url` once the server answers, or None if the process exits or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            return Client(url, verbose=False)
        except Exception:  # not listening yet
            time.sleep(0.5)
    return None
