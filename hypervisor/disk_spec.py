"""`--disk PATH[,format=raw|qcow2][,readonly=on][,serial=S][,snapshot=on|,overlay=PATH]`: parsed,
checked, nothing opened.

`snapshot=on` runs the guest on a temporary qcow2 overlay backed by PATH (deleted after the run);
`overlay=FILE` does the same with an overlay that is kept (hypervisor/disk_overlays.py, docs/ci.md).
Either way PATH itself is only ever opened read-only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hypervisor.errors import ConfigError

FORMATS = ("raw", "qcow2")
ON_VALUES = {"on": True, "yes": True, "true": True, "1": True, "off": False, "no": False, "false": False, "0": False}
OPTIONS = ("format", "readonly", "serial", "snapshot", "overlay")
USAGE = "PATH[,format=..][,readonly=on][,serial=..][,snapshot=on][,overlay=FILE]"


@dataclass(frozen=True)
class DiskSpec:
    path: str
    format: str | None = None  # None: probed from the file
    read_only: bool = False
    serial: str = ""
    snapshot: bool = False  # the guest writes to a temporary overlay, PATH is never written
    overlay: str | None = None  # the guest writes to this kept overlay, PATH is never written

    @property
    def throwaway(self) -> bool:
        """The guest's writes go to an overlay, never to `path`."""
        return self.snapshot or self.overlay is not None

    def with_snapshot(self) -> DiskSpec:
        """This disk under `--snapshot`: a temporary overlay unless it has one or is read-only."""
        if self.read_only or self.throwaway:
            return self
        return replace(self, snapshot=True)


def _on_off(text: str, key: str, value: str) -> bool:
    if value.lower() not in ON_VALUES:
        raise ConfigError(f"--disk {text!r}: {key} must be on or off, not {value!r}")
    return ON_VALUES[value.lower()]


def parse_disk_spec(text: str) -> DiskSpec:
    """QEMU's -drive style, with the path first: `disk.qcow2,readonly=on,serial=abc`."""
    path, *options = text.split(",")
    if not path:
        raise ConfigError(f"--disk {text!r}: the path comes first ({USAGE})")
    values: dict[str, str] = {}
    for option in options:
        key, separator, value = option.partition("=")
        if not separator or key not in OPTIONS:
            raise ConfigError(f"--disk {text!r}: unknown option {option!r} ({'=, '.join(OPTIONS)}=)")
        if key in values:
            raise ConfigError(f"--disk {text!r}: {key}= is given twice")
        values[key] = value
    disk_format = values.get("format")
    if disk_format is not None and disk_format not in FORMATS:
        raise ConfigError(f"--disk {text!r}: format must be raw or qcow2, not {disk_format!r}")
    read_only = _on_off(text, "readonly", values.get("readonly", "off"))
    snapshot = _on_off(text, "snapshot", values.get("snapshot", "off"))
    overlay = values.get("overlay")
    if overlay is not None and not overlay:
        raise ConfigError(f"--disk {text!r}: overlay= needs a file name")
    if snapshot and overlay is not None:
        raise ConfigError(f"--disk {text!r}: snapshot=on (a temporary overlay) and overlay= (a kept one) exclude "
                          "each other")  # fmt: skip
    if read_only and (snapshot or overlay is not None):
        raise ConfigError(f"--disk {text!r}: a read-only disk is never written, so it needs no snapshot= or overlay=")
    return DiskSpec(path, disk_format, read_only, values.get("serial", ""), snapshot, overlay)
