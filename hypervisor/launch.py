"""From run options (what `pyhv run` was asked) to a Machine with its guest loaded.

machine.py wires the hardware; this module decides what to boot: the default Linux guest, a
user's kernel (Linux bzImage or vmlinux, or a multiboot ELF), or a raw binary in real mode, with
which command line, initrd and disks. Everything a user names is checked here first, so a
mistake is one ConfigError line before any VM exists.
"""

from __future__ import annotations

import logging
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypervisor.console.protocol import Console
from hypervisor.disk_spec import DiskSpec
from hypervisor.errors import ConfigError
from hypervisor.guest_images import default_guest
from hypervisor.kvm import kvm_is_pvm
from hypervisor.machine import Machine, host_memory_bytes

if TYPE_CHECKING:
    from hypervisor.boot.layout import MmioWindow
    from hypervisor.disk_overlays import DiskSession

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# The console and reboot behaviour pyhv's outcomes rely on: the kernel's messages on COM1 from
# the start, `reboot` through the i8042 (which ends the run), and a panic that reboots at once
# instead of hanging (the panic is recognised on the console and reported as such).
DEFAULT_CMDLINE = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1"
# On kvm_pvm hosts (shared/PLATFORM.md) KVM's emulator cannot run XSAVE/XRSTOR at CPL0; pyhv
# emulates the other failing instructions itself, but XSAVE state is too large to emulate
# faithfully, so the guest is asked not to use it. `pyhv.pvm` tells the bundled guest kernel's
# patch (guest_images/README.md) to keep x87 instructions out of kernel mode from the start;
# other kernels pass the unknown word on to init, which ignores it.
PVM_CMDLINE = "noxsave pyhv.pvm"
DEFAULT_LINUX_MEMORY_MIB = 256
DEFAULT_RAW_MEMORY_MIB = 16


@dataclass
class RunOptions:
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    raw: tuple[Path, int] | None = None
    memory_mib: int | None = None
    cpus: int = 1
    timeout: float | None = None
    debug_exit_port: int = 0x501
    debug_exit_qemu: bool = False
    pvh: bool = False
    hugepages: bool = False
    disks: list[DiskSpec] = field(default_factory=list)
    root: str | None = None
    machine: str = "pc"  # "pc" or "qemu-test" (machine.MACHINE_TYPES)
    pci_devices: tuple[str, ...] = ()  # `--device`: hypervisor.devices.PCI_DEVICE_TYPES
    serial_fast_path: bool = True  # COM1's THR/LSR in the C loop (Machine(serial_fast_path=...))
    exit_history: int = 0  # the last exits kept for a post-mortem (Machine(exit_history=N)); 0: none


@dataclass
class LaunchInfo:
    """What was booted, for the report."""

    kind: str  # "linux", "multiboot", "raw"
    kernel: str | None = None
    cmdline: str = ""
    protocol: str = ""
    pvm_host: bool = False
    source: str = ""  # how the kernel was loaded, e.g. "bzImage (lz4 payload unpacked on the host)"


def _file_size(path: Path, what: str) -> int:
    """The size of a regular file (never a device or a pipe, which could be endless), found
    without reading it, or one ConfigError line saying what is wrong with it."""
    try:
        status = path.stat()
    except FileNotFoundError as error:
        raise ConfigError(f"{what} {path} does not exist") from error
    except PermissionError as error:
        raise ConfigError(f"{what} {path} is not accessible (permission denied)") from error
    except OSError as error:
        raise ConfigError(f"cannot open {what} {path}: {error.strerror}") from error
    if stat.S_ISDIR(status.st_mode):
        raise ConfigError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(status.st_mode):
        raise ConfigError(f"{what} {path} is not a regular file")
    return status.st_size


def _check_fits(path: Path, what: str, size: int, limit: int, room: str = "the guest's RAM") -> None:
    if size > limit:
        raise ConfigError(f"{what} {path} ({_mib(size)}) is larger than {room} ({_mib(limit)})")


def _mib(size: int) -> str:
    return f"{-(-size // MiB)} MiB"


def _read(path: Path, what: str, limit: int) -> bytes:
    """The contents of a regular file of at most `limit` bytes, checked by size before a byte is
    read, or one ConfigError line saying what is wrong with it."""
    size = _file_size(path, what)
    _check_fits(path, what, size, limit)
    try:
        return path.read_bytes()
    except FileNotFoundError as error:
        raise ConfigError(f"{what} {path} does not exist") from error
    except PermissionError as error:
        raise ConfigError(f"{what} {path} is not readable (permission denied)") from error
    except OSError as error:
        raise ConfigError(f"cannot read {what} {path}: {error.strerror}") from error
    except MemoryError:
        raise ConfigError(f"{what} {path} ({_mib(size)}) does not fit in the host's free memory") from None


def _check_memory_fits_host(memory_mib: int) -> None:
    """Guest RAM the host cannot back is refused before any file is read: the file size checks
    below compare against guest RAM, so a huge --mem would otherwise let a huge file be read
    into host memory (MemoryError). Machine repeats this check for its other callers."""
    host_bytes = host_memory_bytes()
    if host_bytes and memory_mib * MiB > host_bytes:
        raise ConfigError(
            f"--mem: {memory_mib} MiB of guest memory is more than this host has ({host_bytes // MiB} MiB)"
        )


def _attach_disks(machine: Machine, specs: list[DiskSpec], session: DiskSession | None) -> list[MmioWindow]:
    """The disks through the run's DiskSession (overlays, write sets, faults) when it has one."""
    if session is not None:
        return session.attach(machine)
    if any(spec.throwaway for spec in specs):
        # Opening the base itself would let the guest write to it: refused, never guessed.
        raise ConfigError("snapshot=on and overlay= disks need the run's DiskSession (hypervisor.disk_overlays)")
    return machine.attach_disks(specs)


def _machine_settings(options: RunOptions) -> dict[str, Any]:
    """The Machine arguments that come from the options as they are, for both kinds of guest."""
    return {
        "cpus": options.cpus, "debug_exit_port": options.debug_exit_port,
        "debug_exit_qemu": options.debug_exit_qemu, "hugepages": options.hugepages,
        "machine_type": options.machine, "pci_devices": options.pci_devices,
        "serial_fast_path": options.serial_fast_path, "exit_history": options.exit_history,
    }  # fmt: skip


def create_machine(
    options: RunOptions, console: Console | None, disks: DiskSession | None = None
) -> tuple[Machine, LaunchInfo]:
    """A Machine with the guest of `options` loaded and ready to `run`. `disks`, when given, is
    the entered DiskSession of `options.disks`: the machine opens its overlays and shims."""
    pvm = kvm_is_pvm()
    if options.raw is not None:
        if options.kernel is not None or options.initrd is not None:
            raise ConfigError("--raw cannot be combined with --kernel or --initrd")
        path, address = options.raw
        _check_memory_fits_host(options.memory_mib or DEFAULT_RAW_MEMORY_MIB)
        data = _read(path, "raw guest", (options.memory_mib or DEFAULT_RAW_MEMORY_MIB) * MiB)
        machine = Machine(options.memory_mib or DEFAULT_RAW_MEMORY_MIB, console=console, pvm_emulation=pvm,
                          **_machine_settings(options))  # fmt: skip
        try:
            _attach_disks(machine, options.disks, disks)  # found by the guest at the virtio-mmio windows
            machine.load_raw_bytes(data, address, str(path))
        except BaseException:
            machine.close()
            raise
        return machine, LaunchInfo("raw", str(path), pvm_host=pvm)

    # The loaders are imported only for kernels, so a --raw run starts faster (a benchmarked
    # target: docs/performance.md).
    from hypervisor.boot.image_format import decompress_if_xz, detect_kernel_format
    from hypervisor.boot.layout import guest_layout
    from hypervisor.boot.loader import prepare_kernel

    kernel_path, initrd_path = options.kernel, options.initrd
    if kernel_path is None:
        kernel_path, default_initrd = default_guest()
        initrd_path = initrd_path or default_initrd
    memory_mib = options.memory_mib or DEFAULT_LINUX_MEMORY_MIB
    # Every size is checked before the first byte is read: the host can back the guest RAM,
    # and the kernel and initrd fit in it, alone and together.
    _check_memory_fits_host(memory_mib)
    ram = memory_mib * MiB
    kernel_size = _file_size(kernel_path, "kernel")
    _check_fits(kernel_path, "kernel", kernel_size, ram)
    if initrd_path:
        initrd_size = _file_size(initrd_path, "initrd")
        _check_fits(initrd_path, "initrd", initrd_size, ram)
        _check_fits(initrd_path, "initrd", initrd_size, ram - kernel_size, "the guest's RAM left beside the kernel")
    kernel = _read(kernel_path, "kernel", ram)
    initrd = _read(initrd_path, "initrd", ram - len(kernel)) if initrd_path else None
    layout = guest_layout(memory_mib * MiB)
    kernel = decompress_if_xz(kernel, layout.ram_size, "kernel")
    kind = detect_kernel_format(kernel, str(kernel_path))

    machine = Machine(memory_mib, console=console, memory_regions=list(layout.memory_regions), pvm_emulation=pvm,
                      **_machine_settings(options))  # fmt: skip
    try:
        assert machine.memory is not None
        if kind == "multiboot":
            cmdline, windows = options.append or "", []
        else:
            cmdline = linux_cmdline(options.append, pvm, options.root)
            windows = _attach_disks(machine, options.disks, disks)
        image = prepare_kernel(machine.memory, layout, kernel, cmdline, initrd, options.cpus, windows,
                               entry="pvh" if options.pvh else "auto", name=str(kernel_path),
                               program_name=kernel_path.name)  # fmt: skip
        info = LaunchInfo("multiboot" if kind == "multiboot" else "linux", str(kernel_path), image.cmdline,
                          image.protocol, pvm, image.source)  # fmt: skip
        machine.set_entry_state(image.entry)
        # A Linux console's panic line and init's status lines explain outcomes; others' never do.
        machine.observer.linux_rules = info.kind == "linux"
    except BaseException:
        machine.close()
        raise
    return machine, info


def linux_cmdline(append: str | None, pvm: bool, root: str | None) -> str:
    """pyhv's defaults, the kvm_pvm fallback, root=, then the user's own words (which win)."""
    parts = [DEFAULT_CMDLINE]
    if pvm:
        parts.append(PVM_CMDLINE)
    if root:
        parts.append(f"root={root} rootwait")
    if append:
        parts.append(append)
    return " ".join(parts)
