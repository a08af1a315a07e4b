"""The step count of train/default_models.sh's four runs that fits a time budget, from bench/throughput.py's
measured training steps (its `train` section):

    python bench/fit_steps.py THROUGHPUT_JSON BUDGET_S ELAPSED_S

The four models train at once on one GPU, which takes about the sum of their solo step times (0.75x of it measured
on an H200 in an earlier run); the trainer's data, logging, evaluations and checkpoints add about 20%, and starting
the processes 25 s. Preparation that ran past 90 s (ELAPSED_S) comes out of BUDGET_S. Prints a multiple of 50 (at
least 100).
"""

import json
import sys


def main():
    path, budget, elapsed = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    train = json.load(open(path))["train"]
    serial = sum(train[k]["step_s"] for k in ("with_sidecars", "without_sidecars", "bidirectional", "ar"))
    budget -= max(0.0, elapsed - 90)
    print(max(100, int((budget - 25) / (1.2 * serial)) // 50 * 50))


if __name__ == "__main__":
    main()
