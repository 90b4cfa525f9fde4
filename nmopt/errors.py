"""Exceptions shared by several layers."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad command-line arguments: reported on one line, exit code 2."""
