"""Access to the compiled cffi module and the ioctl helpers every KVM wrapper uses."""

from __future__ import annotations

import errno
from typing import Any

from hypervisor.errors import HypervisorError, KvmError

try:
    from hypervisor._fastpath import ffi, lib
except ImportError as error:  # pragma: no cover - only on a broken install
    raise HypervisorError(
        "pyhv's C fast path is not built (hypervisor._fastpath is missing); "
        "reinstall with 'pip install .' on a machine with gcc and the Python headers"
    ) from error

__all__ = ["ffi", "lib", "ioctl", "ioctl_value", "read_struct", "write_struct"]


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


def read_struct(fd: int, name: str, struct: str) -> bytes:
    """The raw bytes a KVM_GET_* ioctl fills into a `struct` (state saved without interpreting
    every field: XSAVE, vCPU events, PIT, clock...)."""
    buffer = ffi.new(f"{struct} *")
    ioctl(fd, name, buffer)
    return bytes(ffi.buffer(buffer))


def write_struct(fd: int, name: str, struct: str, data: bytes) -> None:
    """A KVM_SET_* ioctl with `data`, which must be exactly the size of `struct`."""
    buffer = ffi.new(f"{struct} *")
    size = ffi.sizeof(buffer[0])
    if len(data) != size:
        raise KvmError(name, errno.EINVAL, f"{struct} is {size} bytes, not {len(data)}")
    ffi.memmove(buffer, data, len(data))
    ioctl(fd, name, buffer)
