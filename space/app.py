"""R2LM Space: watch a diffusion LM fill a block of tokens in parallel, step by step, and race it against AR decoding.

The app only calls the library's public API, as a user would: the model and tokenizer come from `from_pretrained`
(the three R2LM code files travel with the model, `trust_remote_code=True`), and `model.generate(...,
step_callback=...)` does all the decoding; the app turns each step's canvas into coloured spans.

Run `python space/app.py` (model: env `R2LM_MODEL`, a Hub id or a local folder, else the built-in default model;
server: `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT`, else 127.0.0.1:7860). A model it cannot serve (a missing folder,
a model that is not an R2LM, the Hub offline) ends it with one line saying what to do, exit status 2.
"""

import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, StoppingCriteria


logger = logging.getLogger("r2lm.space")

HERE = Path(__file__).resolve().parent
# The built-in default model: copied next to app.py in a deployed Space, else the repository's models/ folder.
DEFAULT_MODEL_DIRS = (HERE / "r2lm-tiny-pycode", HERE.parent / "models" / "r2lm-tiny-pycode")

MAX_PROMPT_TOKENS = 256
MAX_NEW_TOKENS = 256
MAX_TEMPERATURE = 2.0
BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64)
UNMASKING_RULES = ("confidence", "margin", "entropy", "random", "left_to_right")  # as in docs/API.md
QUEUE_SIZE = 16
CONCURRENCY = 1  # one decode at a time: requests never share the CPU/GPU, so every timing shown is honest

MASK_GLYPH = "▒"
# Tokens committed by the same forward pass share a colour; the colours cycle step after step. Step s gets the
# label "c{s % 8}": the page recomputes every colour of the map on every update, so the map stays small.
PALETTE = ("#f4a261", "#2a9d8f", "#e76f51", "#8ab17d", "#e9c46a", "#6d97d8", "#c77dff", "#ef8fb0")
COLOR_MAP = {"mask": "#d0d0d0", **{f"c{i}": colour for i, colour in enumerate(PALETTE)}}
FRAME_S = 0.05  # at most ~20 canvas updates a second go to the page; the model may step faster

EXAMPLES = [  # prompt, max new tokens, block size, threshold, unmasking rule, temperature
    # Prompts end inside a line: byte-level BPE rarely saw a token boundary at a line's trailing whitespace.
    # The first is the default model's own setting (generation_config.json); the others trade along the table.
    ["import os\n\n\ndef list_python_files(root):\n    result = []\n    for", 64, 4, 0.7, "left_to_right", 0.0],
    ["def fib(n):\n    if", 48, 8, 0.9, "left_to_right", 0.0],
    ['def quote(s):\n    """Return a shell-escaped version of the string *s*."""\n    if', 64, 16, 0.9,
     "left_to_right", 0.0],
    ["def is_prime(n):\n    if", 48, 4, 0.7, "left_to_right", 0.7],
]


class ModelError(Exception):
    """The model cannot be served, for a reason the user can fix; the message says how (one line)."""


def default_model_path():
    """`R2LM_MODEL` if set, else the first built-in default model folder that exists."""
    if os.environ.get("R2LM_MODEL"):
        return os.environ["R2LM_MODEL"]
    for folder in DEFAULT_MODEL_DIRS:
        if folder.is_dir():
            return str(folder)
    raise ModelError(
        "No model: set R2LM_MODEL to a Hub id or a local folder, or provide the default model in one of "
        + ", ".join(str(folder) for folder in DEFAULT_MODEL_DIRS)
    )


def check_model_path(path):
    """Refuses, before anything loads, a path that names no R2LM model: a missing folder (which transformers would
    report as a bad Hub id), a file, a folder without config.json."""
    local = Path(path).expanduser()
    if local.is_file():
        raise ModelError(f"R2LM_MODEL={path} is a file: set it to the folder that holds the model (config.json).")
    if local.is_dir() and not (local / "config.json").is_file():
        inner = local / "final"
        hint = f" (a training run's folder: set R2LM_MODEL={inner})" if (inner / "config.json").is_file() else ""
        raise ModelError(f"R2LM_MODEL={path} holds no model (no config.json){hint}: set it to an R2LM model's folder.")
    if not local.exists():
        try:
            validate_repo_id(path)
        except HFValidationError:
            raise ModelError(
                f"R2LM_MODEL={path}: no such folder (nor a Hub id): set it to an R2LM model's folder or to a Hub id "
                "such as namespace/name."
            ) from None


def load_model(path):
    """Loads the tokenizer and the model (remote code shipped with it) from a Hub id or a local folder; a model that
    is not an R2LM is refused (ModelError) before its weights load."""
    check_model_path(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    except (OSError, ValueError) as error:  # an unknown Hub id, the Hub offline, a corrupt config.json
        reason = " ".join(str(error).split())
        if Path(path).expanduser().is_dir():
            raise ModelError(f"R2LM_MODEL={path}: its config.json cannot be read ({reason}).") from None
        raise ModelError(
            f"R2LM_MODEL={path} is not a local folder, and loading it from the Hub failed ({reason}): check the id and "
            "the connection (HF_HUB_OFFLINE), or set R2LM_MODEL to a local R2LM folder."
        ) from None
    if config.model_type != "r2lm":
        raise ModelError(
            f"R2LM_MODEL={path} is a {config.model_type!r} model, not an R2LM: convert it first (`r2lm-convert "
            f"{path} OUTPUT_DIR`, for a Qwen3 checkpoint) and set R2LM_MODEL=OUTPUT_DIR."
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, config=config, trust_remote_code=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, config=model.config)  # the loaded config: no remote-code question
    return model.to(device).eval(), tokenizer


@dataclass
class Stats:
    """What one decode cost: tokens generated (up to and with EOS), forward passes, wall time."""

    tokens: int
    forward_passes: int
    wall_s: float

    @property
    def tokens_per_s(self):
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_forward(self):
        return self.tokens / self.forward_passes if self.forward_passes else 0.0


def stats_markdown(stats):
    """The final statistics of one decode as a small Markdown table."""
    return (
        "| tokens | forward passes | tokens per forward | wall time | tokens/s |\n|---|---|---|---|---|\n"
        f"| {stats.tokens} | {stats.forward_passes} | {stats.tokens_per_forward:.2f} | {stats.wall_s:.2f} s "
        f"| {stats.tokens_per_s:.1f} |"
    )


def race_markdown(ar, parallel, block_size):
    """The race's result: both lanes' statistics and the measured speedup (ratio of tokens/s)."""
    speedup = parallel.tokens_per_s / ar.tokens_per_s if ar.tokens_per_s else float("nan")
    rows = [("autoregressive (block size 1)", ar), (f"R2LM (block size {block_size})", parallel)]
    table = "| lane | tokens | forward passes | tokens per forward | wall time | tokens/s |\n|---|---|---|---|---|---|\n"
    table += "\n".join(
        f"| {name} | {s.tokens} | {s.forward_passes} | {s.tokens_per_forward:.2f} | {s.wall_s:.2f} s "
        f"| {s.tokens_per_s:.1f} |"
        for name, s in rows
    )
    return f"### Speedup: {speedup:.2f}x tokens/s\n\n{table}\n\nThe lanes run one after the other, so neither " \
           "shares the hardware with the other while it is timed."


class CanvasView:
    """The generated columns as `gr.HighlightedText` spans: masks as a glyph (label "mask"), tokens labelled by the
    colour of the step that committed them. Nothing after the first committed end-of-sequence token is shown."""

    def __init__(self, tokenizer, n_columns, mask_id, eos_ids):
        self.tokenizer, self.mask_id, self.eos_ids = tokenizer, mask_id, eos_ids
        self.tokens = [mask_id] * n_columns
        self.steps = [0] * n_columns
        self.step = 0  # the last step seen

    def update(self, step, canvas):
        """Records the canvas (a list of ids) after `step`; positions unmasked now were committed by `step`."""
        for i, (old, new) in enumerate(zip(self.tokens, canvas)):
            if old == self.mask_id and new != self.mask_id:
                self.steps[i] = step
        self.tokens, self.step = list(canvas), step

    def committed(self):
        """How many columns are filled, and the generated ids up to (and with) the first EOS."""
        ids = []
        for token in self.tokens:
            ids.append(token)
            if token in self.eos_ids:
                break
        return sum(token != self.mask_id for token in ids), ids

    def spans(self):
        """[(text, label), ...] for `gr.HighlightedText`; a newline shows as "↵" before the line break."""
        spans = []
        for token, step in zip(self.tokens, self.steps):
            if token in self.eos_ids:
                break
            if token == self.mask_id:
                spans.append((MASK_GLYPH, "mask"))
            else:
                text = self.tokenizer.decode([token]).replace("\n", "↵\n")
                spans.append((text, f"c{step % len(PALETTE)}"))
        return spans


def as_ui_error(error):
    """A message for the UI (never a stack trace; the trace goes to the server log)."""
    if isinstance(error, gr.Error):
        return error
    if isinstance(error, ValueError):
        return gr.Error(str(error))
    logger.error("Decoding failed", exc_info=error)
    return gr.Error(f"Decoding failed ({type(error).__name__}: {error}).")


class Cancelled(StoppingCriteria):
    """Stops every row once `event` is set (the page went away): `generate` ends after the current block."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_generate(model, prompt_ids, settings):
    """Runs `model.generate` in a thread. Yields `("steps", [(step, canvas), ...])` as steps come (several at once
    when the UI is slower than the model; `canvas` lists the generated columns' ids), then `("done", (output,
    wall_s))`. An error inside `generate` is raised here, as a message for the UI."""
    events, cancel = queue.Queue(), threading.Event()
    n_prompt, n_new = prompt_ids.shape[1], settings["max_new_tokens"]

    def on_step(step, canvas, logits):
        events.put(("step", (step, canvas[0, n_prompt : n_prompt + n_new].tolist())))

    def work():
        try:
            start = time.perf_counter()
            output = model.generate(
                prompt_ids, attention_mask=torch.ones_like(prompt_ids), step_callback=on_step,
                stopping_criteria=[Cancelled(cancel)], return_dict_in_generate=True, **settings,
            )
            events.put(("done", (output, time.perf_counter() - start)))
        except Exception as error:  # handed to the UI thread, which shows it as a message
            events.put(("error", error))

    threading.Thread(target=work, daemon=True).start()
    try:
        while True:
            kind, payload = events.get()
            steps = []
            while kind == "step":
                steps.append(payload)
                if events.empty():
                    break
                kind, payload = events.get_nowait()
            if steps:
                yield "steps", steps
            if kind == "error":
                raise as_ui_error(payload)
            if kind == "done":
                yield "done", payload
                return
    finally:
        cancel.set()  # a no-op after "done"; stops the decoding when the page stops listening


class Decoder:
    """The two listeners of the page (`decode`, `race`), bound to one model and its tokenizer."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.mask_id = model.config.mask_token_id
        eos = model.generation_config.eos_token_id or model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def check(self, prompt, max_new_tokens, block_size, threshold, unmasking, temperature):
        """Checks a request against the caps before any work; returns the prompt's ids (1, T)."""
        if not prompt or not prompt.strip():
            raise gr.Error("Enter a prompt: the model continues it.")
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS or int(max_new_tokens) != max_new_tokens:
            raise gr.Error(f"Max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, got {max_new_tokens}.")
        if int(block_size) not in BLOCK_SIZES:
            raise gr.Error(f"Block size must be one of {BLOCK_SIZES}, got {block_size}.")
        if not 0 < threshold <= 1:
            raise gr.Error(f"Threshold must be in (0, 1], got {threshold}.")
        if unmasking not in UNMASKING_RULES:
            raise gr.Error(f"Unmasking rule must be one of {UNMASKING_RULES}, got {unmasking!r}.")
        if not 0 <= temperature <= MAX_TEMPERATURE:
            raise gr.Error(f"Temperature must be from 0 (greedy) to {MAX_TEMPERATURE}, got {temperature}.")
        prompt_ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        if prompt_ids.shape[1] > MAX_PROMPT_TOKENS:
            raise gr.Error(
                f"The prompt is too long: {prompt_ids.shape[1]} tokens, the limit is {MAX_PROMPT_TOKENS}. "
                "Shorten it and try again."
            )
        return prompt_ids

    @staticmethod
    def settings(max_new_tokens, block_size, threshold, unmasking, temperature):
        """The generation settings, as keyword arguments of `model.generate`."""
        sampling = {"do_sample": True, "temperature": float(temperature)} if temperature > 0 else {"do_sample": False}
        return dict(max_new_tokens=int(max_new_tokens), block_size=int(block_size), threshold=float(threshold),
                    unmasking=unmasking, **sampling)

    def lane(self, prompt_ids, settings):
        """Decodes once; yields `(spans, live status, None)` while it runs, then `(spans, final text, Stats)`."""
        view = CanvasView(self.tokenizer, settings["max_new_tokens"], self.mask_id, self.eos_ids)
        start = shown = time.perf_counter()
        for kind, payload in stream_generate(self.model, prompt_ids, settings):
            if kind == "steps":
                for step, canvas in payload:
                    view.update(step, canvas)
                now = time.perf_counter()
                if now - shown >= FRAME_S:
                    shown, (filled, _) = now, view.committed()
                    yield view.spans(), f"decoding... step {view.step}: {filled} tokens in {now - start:.2f} s " \
                                        f"({filled / (now - start):.1f} tokens/s)", None
            else:
                output, wall_s = payload
                view.update(view.step, output.sequences[0, prompt_ids.shape[1] :].tolist())
                _, ids = view.committed()
                text = self.tokenizer.decode(prompt_ids[0].tolist() + ids, skip_special_tokens=True)
                yield view.spans(), text, Stats(len(ids), output.nfe, wall_s)

    def decode(self, prompt, max_new_tokens, block_size, threshold, unmasking, temperature):
        """Listener of "Decode": streams (canvas, text, stats)."""
        prompt_ids = self.check(prompt, max_new_tokens, block_size, threshold, unmasking, temperature)
        settings = self.settings(max_new_tokens, block_size, threshold, unmasking, temperature)
        for spans, message, stats in self.lane(prompt_ids, settings):
            if stats is None:
                yield spans, gr.skip(), message
            else:
                yield spans, message, stats_markdown(stats)

    def race(self, prompt, max_new_tokens, block_size, threshold, unmasking, temperature):
        """Listener of "Race": block size 1 (AR-equivalent), then the chosen block size; streams both lanes."""
        prompt_ids = self.check(prompt, max_new_tokens, block_size, threshold, unmasking, temperature)
        results = []
        for lane_index, lane_block_size in enumerate((1, int(block_size))):
            settings = self.settings(max_new_tokens, lane_block_size, threshold, unmasking, temperature)
            for spans, message, stats in self.lane(prompt_ids, settings):
                outputs = [gr.skip(), gr.skip(), message if stats is None else gr.skip()]
                outputs[lane_index] = spans
                yield tuple(outputs)
            results.append(stats)
        yield gr.skip(), gr.skip(), race_markdown(*results, int(block_size))


INTRO = """# R2LM: parallel decoding, step by step
R2LM is a Qwen3 decoder with an exact KV cache plus small right-to-left Mamba "sidecars": it fills a whole block of
tokens in a few forward passes. Below, grey {mask} marks a position still masked; every other colour marks the tokens
that one forward pass committed together (colours cycle). **Race** decodes the prompt with block size 1 (one token per
forward pass, like an autoregressive model) and then with your block size, and measures the speedup.
"""


def build_inputs(model):
    """The input column: prompt and decoding settings (defaults from the model's config)."""
    block_size = getattr(model.generation_config, "block_size", None) or model.config.block_size
    block_size = block_size if block_size in BLOCK_SIZES else 16
    threshold = getattr(model.generation_config, "threshold", None) or 0.9
    unmasking = getattr(model.generation_config, "unmasking", None) or "confidence"
    return [
        gr.Textbox(label="Prompt (Python code)", lines=6, value=EXAMPLES[0][0], elem_id="prompt"),
        gr.Slider(1, MAX_NEW_TOKENS, value=64, step=1, label="Max new tokens", elem_id="max-new-tokens"),
        gr.Dropdown(list(BLOCK_SIZES), value=block_size, label="Block size", elem_id="block-size"),
        gr.Slider(0.05, 1.0, value=threshold, step=0.05, label="Threshold (commit every token surer than this)"),
        gr.Dropdown(list(UNMASKING_RULES), value=unmasking, label="Unmasking rule"),
        gr.Slider(0.0, MAX_TEMPERATURE, value=0.0, step=0.05, label="Temperature (0 = greedy)"),
    ]


def canvas_box(label, elem_id):
    return gr.HighlightedText(label=label, color_map=COLOR_MAP, combine_adjacent=False, show_legend=False,
                              show_inline_category=False, elem_id=elem_id)


def build_demo(model, tokenizer):
    """The Space's page for `model` and its `tokenizer` (not launched; call `.queue(...).launch()`)."""
    decoder = Decoder(model, tokenizer)
    with gr.Blocks(title="R2LM: parallel decoding") as demo:
        gr.Markdown(INTRO.format(mask=MASK_GLYPH))
        with gr.Row():
            with gr.Column(scale=1):
                inputs = build_inputs(model)
                with gr.Row():
                    decode_button = gr.Button("Decode", variant="primary", elem_id="decode")
                    race_button = gr.Button("Race vs. block size 1", elem_id="race")
            with gr.Column(scale=2):
                canvas = canvas_box("Canvas (live)", "canvas")
                stats = gr.Markdown("Press **Decode**.", elem_id="stats")
                text = gr.Code(label="Text", language="python", elem_id="text")
        gr.Markdown("## Race")
        with gr.Row():
            ar_canvas = canvas_box("Block size 1 (autoregressive)", "race-ar")
            parallel_canvas = canvas_box("Chosen block size", "race-parallel")
        race_stats = gr.Markdown("Press **Race vs. block size 1**.", elem_id="race-stats")
        gr.Examples(EXAMPLES, inputs=inputs, cache_examples=False)
        listen = dict(inputs=inputs, concurrency_limit=CONCURRENCY, concurrency_id="decoder")
        decode_button.click(decoder.decode, outputs=[canvas, text, stats], api_name="decode", **listen)
        race_button.click(decoder.race, outputs=[ar_canvas, parallel_canvas, race_stats], api_name="race", **listen)
    return demo


def main():
    """`python space/app.py`: loads the model once and serves the page (GRADIO_SERVER_NAME/PORT are honoured)."""
    logging.basicConfig(level=logging.INFO)
    try:
        path = default_model_path()
        model, tokenizer = load_model(path)
    except ModelError as error:
        print(f"space/app.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    logger.info("Serving %s", path)
    build_demo(model, tokenizer).queue(max_size=QUEUE_SIZE).launch()


if __name__ == "__main__":
    main()
