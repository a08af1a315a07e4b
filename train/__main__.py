"""`python -m train` / `r2lm-train` / `accelerate launch -m train`: see `python -m train --help`.

A problem the user can fix (an option out of range, missing data, a corrupt checkpoint...) ends the run with one line
on stderr and exit status 2, before any training where it can be found before (see convert/cli.py).
"""

import contextlib
import json
import os
import sys
from pathlib import Path

from convert.cli import UserError, run_cli

from .cli import PROG, args_from_checkpoint, parse_args
from .trainer import Trainer, latest_checkpoint


def train(argv):
    args = parse_args(argv)
    resume_from = None
    if args.resume is not None:
        resume_from = latest_checkpoint(args.resume)
        args = args_from_checkpoint(resume_from, args)
    created = not Path(args.output_dir).exists()
    try:
        trainer = Trainer(args, resume_from)
    except UserError:
        if created:  # refused before any work (bad data, options, model): leave no empty --output-dir behind
            with contextlib.suppress(OSError):
                os.rmdir(args.output_dir)
        raise
    try:
        results = trainer.run()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the checkpoints written so far stay in {trainer.output_dir}; `{PROG} --resume "
                                f"{trainer.output_dir}` continues from the latest") from None
    if results is not None and trainer.accelerator.is_main_process:
        print(json.dumps(results))
        print(f"final model: {trainer.output_dir / 'final'}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_cli(PROG, train, argv)


if __name__ == "__main__":
    sys.exit(main())
