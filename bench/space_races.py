"""The Space's race on each of its examples, on one CPU thread: block size 1 (the AR-equivalent lane), then the
example's block size, through the Space's own `Decoder.lane` (what the Race button runs); the median of --repeats
races by speedup (ratio of tokens/s).

    python bench/space_races.py [--model DIR] [--repeats 3]     # the default model unless --model or R2LM_MODEL
"""

import argparse
import importlib.util
from pathlib import Path

import torch

APP_FILE = Path(__file__).resolve().parents[1] / "space" / "app.py"


def load_app():
    """space/app.py, the Space's module (space/ is a Space folder, not a package)."""
    spec = importlib.util.spec_from_file_location("r2lm_space_app", APP_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def race(decoder, prompt, max_new, block_size, threshold, unmasking, temperature):
    """(speedup, forward passes at block size 1, forward passes at `block_size`), one race."""
    ids = decoder.check(prompt, max_new, block_size, threshold, unmasking, temperature)
    stats = []
    for lane_block_size in (1, block_size):
        settings = decoder.settings(max_new, lane_block_size, threshold, unmasking, temperature)
        *_, (_, _, result) = decoder.lane(ids, settings)
        stats.append(result)
    return stats[1].tokens_per_s / stats[0].tokens_per_s, stats[0].forward_passes, stats[1].forward_passes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model folder or Hub id (default: the Space's default model)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    app = load_app()
    model, tokenizer = app.load_model(args.model or app.default_model_path())
    decoder = app.Decoder(model, tokenizer)
    for example in app.EXAMPLES:
        runs = [race(decoder, *example) for _ in range(args.repeats)]
        speedup, ar_passes, passes = sorted(runs)[len(runs) // 2]
        _, max_new, block_size, threshold, unmasking, temperature = example
        print(f"blocks of {block_size}, threshold {threshold}, {unmasking}, temperature {temperature}: "
              f"{speedup:.2f}x ({passes} forward passes against {ar_passes}; all: "
              f"{', '.join(f'{r[0]:.2f}x' for r in runs)})")


if __name__ == "__main__":
    main()
