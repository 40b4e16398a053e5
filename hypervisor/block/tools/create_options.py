"""qemu-img's `-o key=value` create options as typed values (block/qcow2/create.py's
Qcow2CreateOptions), shared by `pyhv image create` and convert's output.

Keys, spellings and messages follow qemu-img (block/qcow2.c qcow2_create_opts, util/qemu-option.c
parse_option_bool); sizes go through hypervisor/units.py, the one size parser.
"""

from __future__ import annotations

from hypervisor.block.qcow2.create import Qcow2CreateOptions
from hypervisor.errors import ConfigError
from hypervisor.units import parse_size

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
        kwargs["cluster_size"] = parse_size(options["cluster_size"], what="cluster_size")
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
