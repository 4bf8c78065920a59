"""The `launch` command line (see launch.cli)."""

from launch.cli import cli, main

__all__ = ["cli", "main"]
