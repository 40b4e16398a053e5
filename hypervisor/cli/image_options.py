"""Parsing what users type after `pyhv image`: sizes and `-o key=value,...` lists, as qemu-img does.

Sizes are parsed by hypervisor/units.py, the one size parser (qemu_strtosz's grammar).
"""

from __future__ import annotations

from hypervisor.errors import ConfigError
from hypervisor.units import parse_size


def parse_relative_size(text: str) -> tuple[str, int]:
    """resize's '[+|-]SIZE' -> ('+' | '-' | '', bytes)."""
    sign = text[:1] if text[:1] in "+-" else ""
    return sign, parse_size(text[len(sign) :])


def parse_option_list(values: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Merge `-o a=1,b=2 -o c=3` into a dict; ',,' is a literal comma as in qemu-img."""
    options: dict[str, str] = {}
    for value in values:
        parts = value.replace(",,", "\0").split(",")
        for part in parts:
            part = part.replace("\0", ",")
            if not part:
                continue
            key, sep, val = part.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"invalid option '{part}': expected key=value")
            options[key] = val
    return options


def parse_snapshot_param(text: str) -> tuple[str | None, str | None]:
    """convert's `-l snapshot.name=S`, `-l snapshot.id=N` or `-l S` -> (id, name)."""
    if "=" not in text:
        return None, text
    options = parse_option_list([text])
    snapshot_id = options.pop("snapshot.id", None)
    name = options.pop("snapshot.name", None)
    if options:
        raise ConfigError(
            f"Invalid snapshot parameter '{', '.join(options)}' (use snapshot.name=NAME or snapshot.id=ID)"
        )
    if snapshot_id is None and name is None:
        raise ConfigError("-l needs snapshot.name=NAME or snapshot.id=ID")
    return snapshot_id, name
