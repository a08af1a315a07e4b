"""`python -m train` / `r2lm-train` / `accelerate launch -m train`: see `python -m train --help`."""

import json
import sys

from .cli import args_from_checkpoint, parse_args
from .trainer import Trainer, latest_checkpoint


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    resume_from = None
    if args.resume is not None:
        resume_from = latest_checkpoint(args.resume)
        args = args_from_checkpoint(resume_from, args)
    trainer = Trainer(args, resume_from)
    results = trainer.run()
    if results is not None and trainer.accelerator.is_main_process:
        print(json.dumps(results))
        print(f"final model: {trainer.output_dir / 'final'}")


if __name__ == "__main__":
    main()
