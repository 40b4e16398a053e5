"""Parsing sizes the way QEMU's command line does: 512, 256M, 2G, 1.5G, 4096k."""

from __future__ import annotations

import re

from hypervisor.errors import ConfigError

SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpeb]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str, default_unit: str = "", what: str = "size") -> int:
    """Bytes from `text`; a bare number is in `default_unit` ("" bytes, "M" MiB as for -m)."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"{what} {text!r} is not a size (examples: 512M, 2G, 65536)")
    number, suffix = match.groups()
    multiplier = SUFFIXES[(suffix or default_unit).lower()]
    value = float(number) * multiplier if "." in number else int(number) * multiplier
    if value != int(value):
        raise ConfigError(f"{what} {text!r} is not a whole number of bytes")
    return int(value)
