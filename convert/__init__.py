"""Tools that turn a Qwen3 checkpoint into an R2LM checkpoint and publish it (DESIGN.md section 6); `convert.cli` holds
the error convention all R2LM command lines share."""

from .cli import UserError


__all__ = ["UserError"]
