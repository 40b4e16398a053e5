"""Parsing what users type after `pyhv image`: sizes and `-o key=value,...` lists, as qemu-img does.

Sizes follow QEMU's qemu_strtosz (util/cutils.c): a decimal number, optionally with a fraction,
then an optional binary suffix B, K, M, G, T, P or E (case-insensitive, powers of 1024).
"""

from __future__ import annotations

import re

from hypervisor.block.qcow2.create import Qcow2CreateOptions
from hypervisor.errors import ConfigError

# util/cutils.c qemu_strtosz suffixes: powers of 1024.
SIZE_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]?)\s*$")
# QEMU refuses sizes it cannot represent in an int64.
MAX_SIZE = (1 << 63) - 1

# qemu_opt boolean spellings (util/qemu-option.c parse_option_bool).
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")

QCOW2_CREATE_KEYS = (
    "size",
    "cluster_size",
    "compat",
    "lazy_refcounts",
    "extended_l2",
    "refcount_bits",
    "preallocation",
    "compression_type",
    "backing_file",
    "backing_fmt",
)
RAW_CREATE_KEYS = ("size", "preallocation")


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from '10G', '512', '1.5k'. ConfigError naming `what` on anything else."""
    match = _SIZE_RE.match(text)
    if not match or match.group(2).lower() not in SIZE_SUFFIXES:
        raise ConfigError(
            f"invalid {what} '{text}': use a number of bytes, optionally with a suffix k, M, G, T, P or E"
        )
    number, suffix = match.groups()
    multiplier = SIZE_SUFFIXES[suffix.lower()]
    if "." in number:
        if not suffix or multiplier == 1:
            raise ConfigError(f"invalid {what} '{text}': fractions need a suffix (k, M, G, ...)")
        whole, _, fraction = number.partition(".")
        value = int(whole or "0") * multiplier + int(fraction or "0") * multiplier // 10 ** len(fraction)
    else:
        value = int(number) * multiplier
    if value > MAX_SIZE:
        raise ConfigError(f"invalid {what} '{text}': too large")
    return value


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


def parse_bool(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"Parameter '{key}' expects 'on' or 'off', not '{value}'")


def _parse_int(key: str, value: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise ConfigError(f"Parameter '{key}' expects a number, not '{value}'") from None


def check_keys(options: dict[str, str], allowed: tuple[str, ...], image_format: str) -> None:
    for key in options:
        if key not in allowed:
            raise ConfigError(f"Invalid parameter '{key}' for format {image_format} (supported: {', '.join(allowed)})")


def qcow2_create_options(
    options: dict[str, str], size: int | None, backing_file: str | None, backing_format: str | None
) -> Qcow2CreateOptions:
    """Typed create options from `-o` values plus -b/-F and the size argument."""
    check_keys(options, QCOW2_CREATE_KEYS, "qcow2")
    if "size" in options:
        size = parse_size(options["size"])
    backing_file = options.get("backing_file", backing_file)
    backing_format = options.get("backing_fmt", backing_format)
    kwargs: dict[str, object] = {}
    if "cluster_size" in options:
        kwargs["cluster_size"] = parse_size(options["cluster_size"], "cluster_size")
    if "compat" in options:
        kwargs["compat"] = {"v2": "0.10", "v3": "1.1"}.get(options["compat"], options["compat"])
    for key in ("lazy_refcounts", "extended_l2"):
        if key in options:
            kwargs[key] = parse_bool(key, options[key])
    if "refcount_bits" in options:
        kwargs["refcount_bits"] = _parse_int("refcount_bits", options["refcount_bits"])
    if "preallocation" in options:
        kwargs["preallocation"] = options["preallocation"]
    if "compression_type" in options:
        kwargs["compression_type"] = options["compression_type"]
    if size is None:
        raise ConfigError("Image creation needs a size parameter")
    return Qcow2CreateOptions(size=size, backing_file=backing_file or None, backing_format=backing_format, **kwargs)  # type: ignore[arg-type]


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
