"""The `leoclr` command."""

from leoclr_core.cli.app import app, main

__all__ = ["app", "main"]
