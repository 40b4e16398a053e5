"""Checks that an output path (a report, a trace, a post-mortem folder) can be written, made
before the guest runs: a typo must cost one error line at once, not the outcome of a long run."""

from __future__ import annotations

import os
from pathlib import Path

from hypervisor.errors import ConfigError


def check_writable_file(path: Path, what: str) -> None:
    """`path` can be created or replaced: its folder exists and is writable, it is not a folder."""
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory, not a file")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError(f"{what} {path}: the directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: the directory {folder} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {path} is not writable")


def check_writable_directory(path: Path, what: str) -> None:
    """`path` is a writable folder, or can be made as one (its parent exists and is writable)."""
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{what} {path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {path} is not writable")
        return
    check_writable_file(path, what)
