"""Access to the compiled cffi module and the ioctl helpers every KVM wrapper uses."""

from __future__ import annotations

from typing import Any

from hypervisor.errors import HypervisorError, KvmError

try:
    from hypervisor._fastpath import ffi, lib
except ImportError as error:  # pragma: no cover - only on a broken install
    raise HypervisorError(
        "pyhv's C fast path is not built (hypervisor._fastpath is missing); "
        "reinstall with 'pip install .' on a machine with gcc and the Python headers"
    ) from error

__all__ = ["ffi", "lib", "ioctl", "ioctl_value"]


def ioctl(fd: int, name: str, arg: Any = None) -> int:
    """Runs ioctl `name` (a KVM_* macro name) with a pointer argument; raises KvmError."""
    request = getattr(lib, name)
    result = lib.pyhv_ioctl(fd, request, ffi.NULL if arg is None else arg)
    if result < 0:
        raise KvmError(name, -result)
    return int(result)


def ioctl_value(fd: int, name: str, value: int = 0) -> int:
    """Runs ioctl `name` with an integer argument; raises KvmError."""
    result = lib.pyhv_ioctl_value(fd, getattr(lib, name), value)
    if result < 0:
        raise KvmError(name, -result)
    return int(result)
