"""`python -m evaluate_r2lm [lm-eval options]`: lm-eval's command line with the `r2lm` model registered.

lm-eval 0.4 has no plugin entry point for models, so its own `lm_eval` command does not know `--model r2lm`; this
one does, and takes every other lm-eval option unchanged (`run`, `ls`, `validate`, or the legacy form without a
subcommand). A problem with the model's arguments or a request (unknown argument, mc_num <= 0, an empty continuation,
a context longer than the window), an unknown task, or a task whose dataset cannot be downloaded is printed as one
line and exits with status 2, as the repo's other commands do.
"""

import sys

from convert.cli import UserError, run_cli


PROG = "python -m evaluate_r2lm"


def evaluate(argv):
    """lm-eval's command line on `argv`, its errors that a user fixes as UserErrors."""
    from lm_eval.__main__ import cli_evaluate

    from . import harness  # noqa: F401  (registers r2lm)

    saved = sys.argv
    sys.argv = [PROG, *argv]
    try:
        cli_evaluate()
    except ValueError as err:
        if not str(err).startswith("Tasks not found"):
            raise
        raise UserError(f"{err}: `lm_eval ls tasks` lists lm-eval's tasks; a task of your own needs --include_path "
                        "FOLDER (its YAML's folder).") from None
    except ConnectionError as err:  # datasets, offline or unreachable
        raise UserError(f"{err}: the task's dataset is not in the local cache; connect (unset HF_HUB_OFFLINE and "
                        "HF_DATASETS_OFFLINE) or evaluate a local task (--include_path).") from None
    finally:
        sys.argv = saved


def main(argv=None) -> int:
    return run_cli(PROG, evaluate, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
