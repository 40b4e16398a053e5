"""The error hierarchy: every error pyhv raises on purpose is a HypervisorError.

Each subclass carries the process exit status the CLI maps it to, so the mapping lives next to
the meaning and the CLI never guesses (documented in docs/exit-status.md).
"""

from __future__ import annotations


class HypervisorError(Exception):
    """Base of every deliberate pyhv error. `exit_status` is what `pyhv` exits with."""

    exit_status: int = 1


class ConfigError(HypervisorError):
    """A user-supplied option or file cannot be used (bad size, missing file, bad format)."""

    exit_status = 3


class KvmUnavailableError(HypervisorError):
    """/dev/kvm is missing, not accessible, too old, or lacks a capability pyhv needs."""

    exit_status = 4


class KvmError(HypervisorError):
    """An ioctl failed. Names the ioctl and the errno so the user can look both up."""

    exit_status = 1

    def __init__(self, ioctl: str, errno_value: int, detail: str = "") -> None:
        import os

        self.ioctl = ioctl
        self.errno = errno_value
        message = f"{ioctl} failed: {os.strerror(errno_value)} (errno {errno_value})"
        if detail:
            message += f": {detail}"
        super().__init__(message)


class GuestMemoryError(HypervisorError):
    """An access to a guest physical address range that is not (entirely) guest RAM."""

    exit_status = 1


class BusError(HypervisorError):
    """A device range that cannot be inserted (overlap, empty, out of the bus's space)."""

    exit_status = 1


class BootError(ConfigError):
    """A kernel, initrd or command line that cannot be loaded into this machine."""


class ImageError(ConfigError):
    """A disk image that cannot be opened or used as asked."""


class ImageFormatError(ImageError):
    """The image is not of the format claimed, or uses a feature pyhv does not support."""


class ImageCorruptError(ImageError):
    """The image's metadata contradicts itself (qcow2 'corrupt' in QEMU's words)."""


class ImageLockedError(ImageError):
    """Another process holds the image open for writing."""
