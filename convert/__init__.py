"""Tools that turn a Qwen3 checkpoint into an R2LM checkpoint and publish it (DESIGN.md section 6)."""


class UserError(Exception):
    """A problem the user can fix (bad argument, wrong source, offline...): the CLIs print it and exit with 2."""
