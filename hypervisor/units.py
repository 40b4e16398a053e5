"""Sizes as QEMU's command line and qemu-img take them: 512, 256M, 2G, 1.5G, .5G, 1.1k.

The grammar is qemu_strtosz's (QEMU util/cutils.c, do_strtosz): a decimal number, optionally with
a fraction (`1.5`, `.5`, `2.`), then an optional one-letter suffix B, K, M, G, T, P or E
(case-insensitive, powers of 1024), with nothing after it: `512MiB`, `1 G` and `1G ` are
refused, as QEMU refuses them. Hexadecimal sizes, which QEMU still takes but deprecates, are not.
A fraction needs a multiplier above one (`1.5` bytes is refused, `1.5k` is 1536) and is
truncated to whole bytes (`1.1k` is 1126). A bare number is in `default_unit`:
bytes for qemu-img, MiB for `--mem` (qemu_strtosz_MiB). Sizes above INT64_MAX are refused.
"""

from __future__ import annotations

import re

from hypervisor.errors import ConfigError

# qemu_strtosz suffixes: powers of 1024.
SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
# strtod skips leading white space; anything after the suffix letter is refused.
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)([a-zA-Z]?)\Z")
# QEMU refuses sizes it cannot represent in an int64.
MAX_SIZE = (1 << 63) - 1


def parse_size(text: str, default_unit: str = "", what: str = "size") -> int:
    """Bytes from `text`; a bare number is in `default_unit` ("" bytes, "M" MiB as for -m).
    ConfigError naming `what` on anything else (the grammar is in the module docstring)."""
    match = _SIZE.match(text)
    if not match or match.group(2).lower() not in SUFFIXES:
        raise ConfigError(
            f"invalid {what} {text!r}: not a size; use a number, optionally with a fraction and one "
            "of the suffixes B, K, M, G, T, P, E (examples: 512M, 1.5G, 65536)"
        )
    number, suffix = match.groups()
    multiplier = SUFFIXES[(suffix or default_unit).lower()]
    if "." in number:
        if multiplier == 1:
            raise ConfigError(f"invalid {what} {text!r}: not a whole number of bytes (a fraction needs K, M, G...)")
        whole, _, fraction = number.partition(".")
        value = int(whole or "0") * multiplier + int(fraction or "0") * multiplier // 10 ** len(fraction)
    else:
        value = int(number) * multiplier
    if value > MAX_SIZE:
        raise ConfigError(f"invalid {what} {text!r}: too large (more than 8 EiB)")
    return value
