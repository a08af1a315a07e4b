"""`python -m evaluate_r2lm [lm-eval options]`: lm-eval's command line with the `r2lm` model registered.

lm-eval 0.4 has no plugin entry point for models, so its own `lm_eval` command does not know `--model r2lm`; this
one does, and takes every other lm-eval option unchanged (`run`, `ls`, `validate`, or the legacy form without a
subcommand). A problem with the model's arguments or a request (unknown argument, mc_num <= 0, an empty continuation,
a context longer than the window) is printed as one line and exits with status 2, as the repo's other commands do.
"""

import sys

from convert.cli import UserError, one_line


PROG = "python -m evaluate_r2lm"


def main(argv=None) -> int:
    from lm_eval.__main__ import cli_evaluate

    from . import harness  # noqa: F401  (registers r2lm)

    saved = sys.argv
    sys.argv = [PROG] + list(sys.argv[1:] if argv is None else argv)
    try:
        cli_evaluate()
    except UserError as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr, flush=True)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
