"""Retakes space/screenshot.png: the Space on its default model (or R2LM_MODEL) after a decode and a race of an example.

    python space/screenshot.py [--example 0] [--out space/screenshot.png]

Serves the page on a free localhost port (torch on one thread), opens it in headless Chromium (playwright), fills the
inputs from `EXAMPLES[--example]`, presses Decode, waits for its statistics, presses Race, waits for the speedup, and
saves a full-page screenshot (to a temporary file, then renamed).
"""

import argparse
import os
import shutil
import socket
import sys
from pathlib import Path

import app  # the Space's module: run as a script, this file's folder is on the path
import torch


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--example", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("screenshot.png"))
    args = ap.parse_args()
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("space/screenshot.py: error: no Chromium on this machine (`apt-get install chromium`).")
    torch.set_num_threads(1)
    model, tokenizer = app.load_model(app.default_model_path())
    prompt, max_new, block, threshold, rule, temperature = app.EXAMPLES[args.example]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.build_demo(model, tokenizer).queue(max_size=app.QUEUE_SIZE)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
            page.get_by_text(prompt.splitlines()[0]).first.wait_for()  # the examples table is there
            page.locator("table").get_by_text(prompt.splitlines()[0]).first.click()  # fills every input
            page.locator("#decode").click()
            expect(page.locator("#stats")).to_contain_text("tokens per forward", timeout=300_000)
            page.locator("#race").click()
            expect(page.locator("#race-stats")).to_contain_text("Speedup", timeout=300_000)
            tmp = args.out.with_name(f".{args.out.name}.tmp.png")
            page.screenshot(path=tmp, full_page=True)
            os.replace(tmp, args.out)
            browser.close()
    finally:
        demo.close()
    print(f"{args.out}: example {args.example} ({max_new} tokens, block {block}, threshold {threshold}, {rule}, "
          f"temperature {temperature})")


if __name__ == "__main__":
    main()
