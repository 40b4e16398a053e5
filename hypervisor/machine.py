"""The only module that wires everything together: KVM, memory, buses, devices, vCPUs.

Read it top to bottom as a boot sequence: open KVM and create the VM with its in-kernel
interrupt controllers and timer, give it RAM, put devices on the buses, create the vCPUs,
load a guest, run the vCPU threads until an outcome, and tear everything down.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from hypervisor.boot.cpu_state import EntryState
from hypervisor.boot.cpuid import guest_cpuid
from hypervisor.boot.layout import MmioWindow, virtio_mmio_window
from hypervisor.boot.raw import load_raw, prepare_raw
from hypervisor.debug.console_observer import ConsoleObserver
from hypervisor.devices.bus import Bus, Device
from hypervisor.devices.cmos import PORT_COUNT as CMOS_PORT_COUNT
from hypervisor.devices.cmos import CmosRtc
from hypervisor.devices.debug_exit import DEBUG_EXIT_PORT_SIZE, DEFAULT_DEBUG_EXIT_PORT, DebugExit
from hypervisor.devices.irq import IrqFdLine, KvmIrqLine
from hypervisor.disk_spec import DiskSpec
from hypervisor.errors import ConfigError, HypervisorError
from hypervisor.kvm import Kvm, Vcpu, Vm
from hypervisor.kvm.vcpu import TableRange
from hypervisor.memory import GuestMemory
from hypervisor.outcome import Outcome, OutcomeKind
from hypervisor.vcpu.control import RunControl
from hypervisor.vcpu.pvm import PvmEmulator
from hypervisor.vcpu.runner import Emulator, ExitHook, VcpuRunner
from hypervisor.vcpu.setup import apply_entry_state, configure_boot_msrs, configure_lapic
from hypervisor.vcpu.stats import merge_statistics, vcpu_statistics

if TYPE_CHECKING:
    from hypervisor.block.backend import BlockBackend
    from hypervisor.virtio.mmio import MmioTransport

log = logging.getLogger(__name__)

MiB = 1024 * 1024
PORT_SPACE = 0x10000
MMIO_SPACE = 1 << 52  # x86-64 physical address width ceiling (SDM vol. 1 §3.3.7.1)
# Port 0x80 is the POST-code port every BIOS and Linux's io_delay() write to; sinking it in C
# keeps those writes off the Python path.
POST_CODE_PORT = 0x80
COM1_PORT = 0x3F8  # PC/AT COM1, IRQ 4
COM1_IRQ = 4
UART_REGISTERS = 8
CMOS_PORT = 0x70  # PC/AT CMOS RTC index (0x70) and data (0x71)
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
STOP_GRACE_SECONDS = 5.0


def host_memory_bytes() -> int:
    """The host's physical memory (MemTotal), or 0 when it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Console(Protocol):
    """Where the guest's serial output goes and its input comes from (hypervisor.console)."""

    def write(self, data: bytes) -> None: ...

    def start(self, feed: Callable[[bytes], object], on_quit: Callable[[], None]) -> None: ...

    def close(self) -> None: ...


@dataclass
class AttachedDisk:
    name: str
    spec: DiskSpec
    transport: MmioTransport
    interrupt: IrqFdLine


@dataclass
class RunResult:
    outcome: Outcome
    wall_seconds: float
    statistics: dict[str, object]
    per_vcpu: list[dict[str, object]] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return self.outcome.exit_status


class Machine:
    """A VM with RAM, a COM1 UART, the debug-exit port and the PC reset path.

    The Python API the CLI and the tests use: create, `load`, `set_entry_state` or
    `set_registers`, `run`, read `RunResult` and the console, `close` (or use `with`).
    """

    def __init__(
        self,
        memory_mib: int = 128,
        *,
        cpus: int = 1,
        console: Console | None = None,
        debug_exit_port: int = DEFAULT_DEBUG_EXIT_PORT,
        debug_exit_qemu: bool = False,
        hugepages: bool = False,
        memory_regions: list[tuple[int, int]] | None = None,
        pvm_emulation: bool = False,
    ) -> None:
        if memory_mib <= 0:
            raise ConfigError(f"guest memory must be at least 1 MiB, not {memory_mib} MiB")
        if cpus < 1:
            raise ConfigError(f"a machine needs at least one vCPU, not {cpus}")
        self.control = RunControl()
        self.observer = ConsoleObserver()
        self.console = console
        self.emulator: Emulator | None = None
        self.memory_size = memory_mib * MiB
        self._closed = False
        self.kvm: Kvm | None = None
        self.vm: Vm | None = None
        self.memory: GuestMemory | None = None
        self.vcpus: list[Vcpu] = []
        self.runners: list[VcpuRunner] = []
        self.pio_bus = Bus("port I/O", PORT_SPACE)
        self.mmio_bus = Bus("MMIO", MMIO_SPACE)
        self._sinks: list[TableRange] = []
        self._threads: list[threading.Thread] = []
        self.disks: list[AttachedDisk] = []
        self.exit_hooks: list[ExitHook] = []  # given to every vCPU runner at start()
        try:
            self._create_vm(cpus)
            self._create_memory(memory_regions or [(0, self.memory_size)], hugepages)
            if pvm_emulation:
                assert self.memory is not None
                self.emulator = PvmEmulator(self.memory)
            self._create_platform_devices(debug_exit_port, debug_exit_qemu)
            self._create_vcpus(cpus)
        except BaseException:
            self.close()
            raise

    # -- the boot sequence ------------------------------------------------------------------

    def _create_vm(self, cpus: int) -> None:
        self.kvm = Kvm()
        if cpus > self.kvm.max_vcpus:
            raise ConfigError(f"{cpus} vCPUs asked for; this KVM allows at most {self.kvm.max_vcpus}")
        self.vm = self.kvm.create_vm()
        self.vm.set_tss_address()
        self.vm.set_identity_map_address()
        self.vm.create_irqchip()
        self.vm.create_pit2()

    def _create_memory(self, regions: list[tuple[int, int]], hugepages: bool) -> None:
        assert self.vm is not None
        host_bytes = host_memory_bytes()
        if host_bytes and self.memory_size > host_bytes:
            raise ConfigError(
                f"{self.memory_size // MiB} MiB of guest memory is more than this host has "
                f"({host_bytes // MiB} MiB)"
            )
        self.memory = GuestMemory(regions, hugepages=hugepages)
        self.vm.map_memory(self.memory)

    def _create_platform_devices(self, debug_exit_port: int, debug_exit_qemu: bool) -> None:
        assert self.vm is not None
        from hypervisor.devices.i8042 import I8042Controller
        from hypervisor.devices.serial import Serial16550A

        self.serial = Serial16550A(on_output=self._serial_output, interrupt=KvmIrqLine(self.vm, COM1_IRQ))
        self.add_port_device(self.serial, COM1_PORT, UART_REGISTERS, "COM1")
        # Two one-byte ranges: port 0x61 between them is the in-kernel PIT's speaker port.
        self.i8042 = I8042Controller(on_reset=self._guest_reset)
        self.add_port_device(self.i8042.data_port, I8042_DATA_PORT, 1, "i8042 data")
        self.add_port_device(self.i8042.command_port, I8042_COMMAND_PORT, 1, "i8042 command")
        self.rtc = CmosRtc()
        self.add_port_device(self.rtc, CMOS_PORT, CMOS_PORT_COUNT, "CMOS RTC")
        self.debug_exit = DebugExit(self._guest_debug_exit, qemu_compatible=debug_exit_qemu)
        self.add_port_device(self.debug_exit, debug_exit_port, DEBUG_EXIT_PORT_SIZE, "debug-exit")
        self.add_sink_ports(POST_CODE_PORT, 1)

    def _create_vcpus(self, count: int) -> None:
        assert self.vm is not None and self.kvm is not None
        cpuid = self.kvm.supported_cpuid()
        for index in range(count):
            vcpu = self.vm.create_vcpu(index)
            vcpu.set_cpuid(guest_cpuid(cpuid, index, count))
            configure_boot_msrs(vcpu)
            configure_lapic(vcpu)
            vcpu.set_fpu()
            self.vcpus.append(vcpu)
            self.control.attach(vcpu)


    # -- devices ------------------------------------------------------------------------------

    def add_port_device(self, device: Device, base: int, size: int, name: str | None = None) -> None:
        self.pio_bus.insert(device, base, size, name)

    def add_mmio_device(self, device: Device, base: int, size: int, name: str | None = None) -> None:
        self.mmio_bus.insert(device, base, size, name)

    def add_sink_ports(self, base: int, size: int, fill: int = 0xFF) -> None:
        """Ports whose writes are dropped and reads return `fill`, entirely inside the C loop."""

        class _Sink:
            def read(self, offset: int, data: memoryview) -> None:
                data[:] = bytes([fill]) * len(data)

            def write(self, offset: int, data: bytes) -> None:
                pass

        entry = self.pio_bus.insert(_Sink(), base, size, f"sink {base:#x}")
        self._sinks.append(TableRange(base, size, entry.device_id, sink=True, fill=fill))

    def attach_disks(
        self, disks: Sequence[DiskSpec], wrap_backend: Callable[[BlockBackend], BlockBackend] | None = None
    ) -> list[MmioWindow]:
        """virtio-blk disks (vda, vdb, ...) each in its own virtio-mmio window and IRQ.

        Returns the windows, which a Linux guest learns from `virtio_mmio.device=` words on its
        command line. QueueNotify writes go to an ioeventfd, so a vCPU never waits for the disk;
        completions come back through an irqfd from the device's I/O thread. `wrap_backend`
        may put a shim around each opened backend (tracing, timing).
        """
        assert self.vm is not None and self.memory is not None
        if not disks:
            return []
        # Imported here so that machines without disks do not load the virtio and qcow2 code.
        from hypervisor.block.open import open_disk
        from hypervisor.virtio.blk import VirtioBlock
        from hypervisor.virtio.mmio import QUEUE_NOTIFY_OFFSET, MmioTransport

        windows = []
        for spec in disks:
            index = len(self.disks)
            name = "vd" + chr(ord("a") + index)
            window = virtio_mmio_window(index)
            backend = open_disk(spec.path, spec.format, spec.read_only, allow_backing=True)
            if wrap_backend is not None:
                backend = wrap_backend(backend)
            try:
                device = VirtioBlock(backend, serial=spec.serial, name=name)
            except BaseException:
                backend.close()
                raise
            interrupt = IrqFdLine(self.vm, window.irq)
            transport = MmioTransport(device, self.memory, interrupt, name=name)
            self.disks.append(AttachedDisk(name, spec, transport, interrupt))
            self.add_mmio_device(transport, window.gpa, window.size, name)
            for queue in range(len(device.queue_max_sizes)):
                self.vm.register_ioeventfd(
                    transport.notify_eventfd(queue), window.gpa + QUEUE_NOTIFY_OFFSET, 4, datamatch=queue
                )
            log.info("%s: %s (%s%s) at %#x, IRQ %d", name, spec.path, backend.__class__.__name__,
                     ", read-only" if spec.read_only else "", window.gpa, window.irq)  # fmt: skip
            windows.append(window)
        return windows

    # -- loading a guest ------------------------------------------------------------------------

    def load(self, data: bytes, address: int, name: str = "the data") -> None:
        """Copies `data` into guest RAM at `address`; BootError (one line) if it does not fit."""
        assert self.memory is not None
        load_raw(self.memory, data, address, name)

    def load_raw_bytes(self, data: bytes, address: int, name: str = "the raw guest") -> None:
        """`--raw FILE@ADDR`: a flat binary entered in real mode at its first byte."""
        assert self.memory is not None
        self.set_entry_state(prepare_raw(self.memory, data, address, name).entry)

    def set_entry_state(self, state: EntryState, vcpu_index: int = 0) -> None:
        apply_entry_state(self.vcpus[vcpu_index], state)

    def set_registers(self, vcpu_index: int = 0, **registers: int) -> None:
        self.vcpus[vcpu_index].set_regs(**registers)

    # -- device callbacks (run on vCPU threads) --------------------------------------------------

    def _serial_output(self, data: bytes) -> None:
        self.observer.feed(data)
        if self.console is not None:
            self.console.write(data)

    def _guest_debug_exit(self, status: int) -> None:
        self.control.request_stop(Outcome(OutcomeKind.DEBUG_EXIT, code=status))

    def _guest_reset(self) -> None:
        self.control.request_stop(Outcome(OutcomeKind.RESET, "the guest reset the machine through the i8042"))

    def request_stop(self, outcome: Outcome) -> None:
        self.control.request_stop(outcome)

    # -- running -----------------------------------------------------------------------------------

    def install_range_tables(self) -> None:
        """Freezes the buses into every vCPU's C range table (done by `start`)."""
        sink_ids = {sink.device_id for sink in self._sinks}
        pio = [TableRange(r.base, r.size, r.device_id) for r in self.pio_bus.ranges() if r.device_id not in sink_ids]
        pio += self._sinks
        mmio = [TableRange(r.base, r.size, r.device_id) for r in self.mmio_bus.ranges()]
        for vcpu in self.vcpus:
            vcpu.set_range_tables(pio, mmio)

    def start(self) -> None:
        """Starts the vCPU threads (and the console); `wait` collects the outcome."""
        self.install_range_tables()
        for disk in self.disks:
            disk.transport.start()
        if self.console is not None:
            quit_outcome = Outcome(OutcomeKind.QUIT, "quit from the console")
            self.console.start(self.serial.feed, lambda: self.request_stop(quit_outcome))
        self._started_at = time.monotonic()
        self.observer.restart_clock()
        for vcpu in self.vcpus:
            runner = VcpuRunner(vcpu, self.pio_bus, self.mmio_bus, self.control, self.emulator)
            runner.hooks.extend(self.exit_hooks)
            self.runners.append(runner)
            thread = threading.Thread(target=self._vcpu_thread, args=(runner,), name=f"vcpu{vcpu.id}", daemon=True)
            self._threads.append(thread)
            thread.start()

    @staticmethod
    def _vcpu_thread(runner: VcpuRunner) -> None:
        # Terminal signals belong to the main thread, which turns them into an outcome; a vCPU
        # thread only ever sees the kick signal.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        runner.run()

    def wait(self, timeout: float | None = None) -> RunResult:
        deadline = None if timeout is None else self._started_at + timeout
        try:
            while not self.control.finished.is_set():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self.control.request_stop(Outcome(OutcomeKind.TIMEOUT, f"no outcome within {timeout:g} s"))
                    break
                self.control.finished.wait(0.25 if remaining is None else min(remaining, 0.25))
        except KeyboardInterrupt:
            self.control.request_stop(Outcome(OutcomeKind.INTERRUPTED, "interrupted on the host"))
        wall = time.monotonic() - self._started_at
        self._join_threads()
        outcome = self.control.outcome
        assert outcome is not None
        outcome = self.observer.explain(outcome)
        per_vcpu = [vcpu_statistics(vcpu) for vcpu in self.vcpus]
        statistics = merge_statistics(per_vcpu)
        self._warn_about_unmapped(statistics)
        return RunResult(outcome, wall, statistics, per_vcpu)

    def run(self, timeout: float | None = None) -> RunResult:
        """Runs the guest until it stops (or `timeout` seconds pass) and returns the result."""
        self.start()
        return self.wait(timeout)

    def _join_threads(self) -> None:
        for thread in self._threads:
            thread.join(STOP_GRACE_SECONDS)
            if thread.is_alive():
                log.error("vCPU thread %s did not stop within %g s", thread.name, STOP_GRACE_SECONDS)

    @staticmethod
    def _warn_about_unmapped(statistics: dict[str, object]) -> None:
        ports = int(statistics["pio_unmapped_reads"]) + int(statistics["pio_unmapped_writes"])  # type: ignore[call-overload]
        if ports:
            log.warning(
                "the guest made %d accesses to ports with no device (first at %#x): reads "
                "returned 0xff, writes were ignored",
                ports,
                statistics["first_unmapped_port"],
            )
        mmio = int(statistics["mmio_unmapped_reads"]) + int(statistics["mmio_unmapped_writes"])  # type: ignore[call-overload]
        if mmio:
            log.warning(
                "the guest made %d accesses to MMIO addresses with no device (first at %#x): "
                "reads returned 0, writes were ignored",
                mmio,
                statistics["first_unmapped_mmio"],
            )

    # -- teardown -------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._threads and not self.control.finished.is_set():
            self.control.request_stop(Outcome(OutcomeKind.INTERRUPTED, "machine closed"))
            self._join_threads()
        if self.console is not None:
            try:
                self.console.close()
            except HypervisorError:
                log.exception("closing the console failed")
        # Devices go before guest memory: their rings hold views of it.
        for disk in self.disks:
            disk.transport.close()
            disk.interrupt.close()
        if self.vm is not None:
            self.vm.close()
        if self.memory is not None and not any(t.is_alive() for t in self._threads):
            self.memory.close()
        if self.kvm is not None:
            self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
