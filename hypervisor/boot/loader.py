"""One entry point for `pyhv run --kernel FILE`: recognise the kernel and call its loader.

Linux (bzImage or ELF vmlinux, optionally xz-compressed) goes to `prepare_linux`, a multiboot
kernel to `prepare_multiboot`; anything else is refused with one line naming what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypervisor.boot.image_format import decompress_if_xz, detect_kernel_format
from hypervisor.boot.layout import GuestLayout, MmioWindow
from hypervisor.boot.linux import LinuxEntry, prepare_linux
from hypervisor.boot.multiboot import prepare_multiboot
from hypervisor.boot.placement import BootImage
from hypervisor.memory import GuestMemory


def prepare_kernel(
    memory: GuestMemory,
    guest: GuestLayout,
    kernel: bytes,
    cmdline: str,
    initrd: bytes | None = None,
    cpus: int = 1,
    mmio_devices: Sequence[MmioWindow] = (),
    entry: LinuxEntry = "auto",
    name: str = "the kernel",
    program_name: str | None = None,
    unpack_bzimage: bool = True,
) -> BootImage:
    """Load `kernel` whatever its format; see `prepare_linux` and `prepare_multiboot`.

    `name` names the kernel in error messages (e.g. the path given by the user). For a
    multiboot kernel, `program_name` (e.g. the file's name) becomes the first word of its
    command line, as kvm-unit-tests expect; `mmio_devices` are not described to it.
    """
    kernel = decompress_if_xz(kernel, memory.size, "kernel")
    if detect_kernel_format(kernel, name) == "multiboot":
        return prepare_multiboot(memory, guest, kernel, cmdline, initrd, cpus, kernel_name=program_name, name=name)
    return prepare_linux(memory, guest, kernel, cmdline, initrd, cpus, mmio_devices, entry, name, unpack_bzimage)
