"""`--disk PATH[,format=raw|qcow2][,readonly=on][,serial=S]`: parsed, checked, nothing opened."""

from __future__ import annotations

from dataclasses import dataclass

from hypervisor.errors import ConfigError

FORMATS = ("raw", "qcow2")
ON_VALUES = {"on": True, "yes": True, "true": True, "1": True, "off": False, "no": False, "false": False, "0": False}


@dataclass(frozen=True)
class DiskSpec:
    path: str
    format: str | None = None  # None: probed from the file
    read_only: bool = False
    serial: str = ""


def parse_disk_spec(text: str) -> DiskSpec:
    """QEMU's -drive style, with the path first: `disk.qcow2,readonly=on,serial=abc`."""
    path, *options = text.split(",")
    if not path:
        raise ConfigError(f"--disk {text!r}: the path comes first (PATH[,format=..][,readonly=on][,serial=..])")
    values: dict[str, str] = {}
    for option in options:
        key, separator, value = option.partition("=")
        if not separator or key not in ("format", "readonly", "serial"):
            raise ConfigError(f"--disk {text!r}: unknown option {option!r} (format=, readonly=, serial=)")
        if key in values:
            raise ConfigError(f"--disk {text!r}: {key}= is given twice")
        values[key] = value
    disk_format = values.get("format")
    if disk_format is not None and disk_format not in FORMATS:
        raise ConfigError(f"--disk {text!r}: format must be raw or qcow2, not {disk_format!r}")
    read_only_text = values.get("readonly", "off").lower()
    if read_only_text not in ON_VALUES:
        raise ConfigError(f"--disk {text!r}: readonly must be on or off, not {read_only_text!r}")
    return DiskSpec(path, disk_format, ON_VALUES[read_only_text], values.get("serial", ""))
