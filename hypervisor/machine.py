"""The only module that wires everything together: KVM, memory, buses, devices, vCPUs.

Read it top to bottom as a boot sequence: open KVM and create the VM with its in-kernel
interrupt controllers and timer, give it RAM, put devices on the buses, create the vCPUs,
load a guest, run the vCPU threads until an outcome, and tear everything down.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from hypervisor.boot.cpu_state import EntryState
from hypervisor.boot.cpuid import guest_cpuid
from hypervisor.boot.layout import MmioWindow, virtio_mmio_window
from hypervisor.boot.raw import load_raw, prepare_raw
from hypervisor.console.protocol import Console
from hypervisor.debug.console_observer import ConsoleObserver
from hypervisor.devices import PCI_DEVICE_TYPES
from hypervisor.devices.bus import Bus, Device
from hypervisor.devices.cmos import PORT_COUNT as CMOS_PORT_COUNT
from hypervisor.devices.cmos import CmosRtc
from hypervisor.devices.debug_exit import DEBUG_EXIT_PORT_SIZE, DEFAULT_DEBUG_EXIT_PORT, DebugExit
from hypervisor.disk_spec import DiskSpec
from hypervisor.errors import ConfigError, HypervisorError
from hypervisor.kvm import Kvm, Vcpu, Vm, kvm_is_pvm
from hypervisor.kvm.irq import IrqFdLine, KvmIrqLine
from hypervisor.kvm.vcpu import MP_STATE_HALTED, TableRange
from hypervisor.memory import GuestMemory
from hypervisor.outcome import Outcome, OutcomeKind
from hypervisor.process_signals import block_terminal_signals
from hypervisor.vcpu.breakpoints import Action, Breakpoint, BreakpointTable, Condition
from hypervisor.vcpu.control import RunControl, Stop
from hypervisor.vcpu.events import ExitEvent
from hypervisor.vcpu.pvm import PvmEmulator
from hypervisor.vcpu.runner import Emulator, ExitHook, VcpuRunner
from hypervisor.vcpu.setup import apply_entry_state, configure_boot_msrs, configure_lapic
from hypervisor.vcpu.stats import RunStatistics, VcpuStatistics, merge_statistics, vcpu_statistics

if TYPE_CHECKING:
    from hypervisor.block.backend import BlockBackend
    from hypervisor.devices.intel_iommu import IntelIommu
    from hypervisor.kvm.uart import UartTransmitBuffer
    from hypervisor.virtio.blk import VirtioBlock
    from hypervisor.virtio.mmio import MmioTransport
    from hypervisor.virtio.worker import QueueWorker

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
# "pc": pyhv's own PC; "qemu-test": plus QEMU's isa-debug-exit (0xf4, 4 ports) and pc-testdev,
# the devices kvm-unit-tests' x86/run adds to QEMU (docs/conformance.md).
MACHINE_TYPES = ("pc", "qemu-test")
# Each PCI function (hypervisor.devices.PCI_DEVICE_TYPES) gets 00:SLOT.0 from slot 2 on, a 1 MiB
# BAR window from 0xfe000000 and an IOAPIC input from 23 down (docs/conformance.md).
FIRST_PCI_SLOT = 2
MAX_PCI_FUNCTIONS = 4
PCI_BAR_WINDOW = 0xFE00_0000
PCI_FIRST_GSI = 23
S3_PAUSE = "s3"  # the RunControl hold of a machine suspended to RAM
QEMU_DEBUG_EXIT_PORT = 0xF4
QEMU_DEBUG_EXIT_SIZE = 4
# A run whose vCPUs made no exit for this long is probed for a halt nothing can end (below).
HALT_PROBE_SECONDS = 1.0
HALT_PROBE_MAX_SECONDS = 8.0
RFLAGS_IF = 1 << 9  # SDM Vol. 1 §3.4.3.3


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


class ExitBudgetCheck(Protocol):
    """What Machine.exit_budget must do (hypervisor.ci.exit_budget.ExitBudget does it)."""

    def check(self, vcpus: Sequence[Vcpu]) -> Outcome | None: ...


@dataclass
class AttachedDisk:
    name: str
    spec: DiskSpec
    transport: MmioTransport
    interrupt: IrqFdLine
    worker: QueueWorker  # the disk's I/O thread: the machine starts, stops and joins it


@dataclass
class RunResult:
    outcome: Outcome
    wall_seconds: float
    statistics: RunStatistics
    per_vcpu: list[VcpuStatistics] = field(default_factory=list)
    # Linux guests: the kernel's trouble reports seen on the console (hypervisor.debug.kernel_log).
    kernel_reports: dict[str, object] | None = None

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
        exit_history: int = 0,
        machine_type: str = "pc",
        memory_file: int = -1,
        pci_devices: Sequence[str] = (),
        serial_fast_path: bool = True,
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
        self._pci_gsis: set[int] = set()  # IOAPIC inputs the PCI functions' INTx took
        self.iommu: IntelIommu | None = None
        self._threads: list[threading.Thread] = []
        self.disks: list[AttachedDisk] = []
        self.exit_hooks: list[ExitHook] = []  # seen by every vCPU runner, also while running
        self.breakpoints = BreakpointTable(on_change=self._observers_changing)
        # COM1's THR writes and LSR reads served in the C loop (hypervisor/kvm/uart.py) while
        # nothing observes exits; created at start.
        self._serial_fast_path_wanted = serial_fast_path
        self.uart_buffer: UartTransmitBuffer | None = None
        self._observed_from_start = False
        self._asleep_until: float | None = None  # S3: the RTC alarm's host time (inf: no wake source)
        # The last exits that reached Python, for post-mortems (0: not kept).
        self.exit_history: deque[ExitEvent] | None = deque(maxlen=exit_history) if exit_history > 0 else None
        self._started_at = time.monotonic()
        self._main_thread_calls: list[Callable[[], None]] = []
        # Called with every chunk of console output, on the vCPU thread (keep them cheap), before
        # the console gets it and whatever the console is; one that raises is logged and dropped.
        self.output_watchers: list[Callable[[bytes], None]] = []
        # `--max-exits` (hypervisor.ci.exit_budget.ExitBudget): checked by wait() every quarter
        # second, so a run may overshoot its budget by that long's exits.
        self.exit_budget: ExitBudgetCheck | None = None
        # What rebuilds this machine's hardware (a snapshot records it; hypervisor.snapshot).
        layout = [list(region) for region in memory_regions or [(0, self.memory_size)]]
        self.config: dict[str, object] = {
            "memory_mib": memory_mib, "cpus": cpus, "debug_exit_port": debug_exit_port,
            "debug_exit_qemu": debug_exit_qemu, "memory_regions": layout, "pvm_emulation": pvm_emulation,
            "machine_type": machine_type, "pci_devices": list(pci_devices),
        }  # fmt: skip
        try:
            self._create_vm(cpus)
            self._create_memory(memory_regions or [(0, self.memory_size)], hugepages, memory_file)
            if pvm_emulation:
                assert self.memory is not None
                self.emulator = PvmEmulator(self.memory)
            self._create_platform_devices(debug_exit_port, debug_exit_qemu, machine_type, cpus, pci_devices)
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

    def _create_memory(self, regions: list[tuple[int, int]], hugepages: bool, memory_file: int = -1) -> None:
        assert self.vm is not None
        host_bytes = host_memory_bytes()
        if host_bytes and self.memory_size > host_bytes:
            raise ConfigError(
                f"{self.memory_size // MiB} MiB of guest memory is more than this host has ({host_bytes // MiB} MiB)"
            )
        self.memory = GuestMemory(regions, hugepages=hugepages, backing_fd=memory_file)
        self.vm.map_memory(self.memory)

    def _create_platform_devices(self, debug_exit_port: int, debug_exit_qemu: bool, machine_type: str,
                                 cpus: int, pci_devices: Sequence[str]) -> None:  # fmt: skip
        assert self.vm is not None and self.memory is not None
        from hypervisor.boot.firmware_pic import MASTER_VECTOR_BASE, SLAVE_VECTOR_BASE, with_vector_base
        from hypervisor.devices import pm
        from hypervisor.devices.fw_cfg import FW_CFG_PORT, FW_CFG_PORT_COUNT, FwCfg, e820_file
        from hypervisor.devices.i8042 import I8042Controller
        from hypervisor.devices.pvpanic import PVPANIC_PORT, PVPANIC_PORT_SIZE, PvPanic
        from hypervisor.devices.serial import Serial16550A

        if machine_type not in MACHINE_TYPES:
            raise ConfigError(f"unknown machine type {machine_type!r}: use {' or '.join(MACHINE_TYPES)}")

        self.serial = Serial16550A(on_output=self._serial_output, interrupt=KvmIrqLine(self.vm, COM1_IRQ))
        self.add_port_device(self.serial, COM1_PORT, UART_REGISTERS, "COM1")
        # Two one-byte ranges: port 0x61 between them is the in-kernel PIT's speaker port.
        self.i8042 = I8042Controller(on_reset=self._guest_reset)
        self.add_port_device(self.i8042.data_port, I8042_DATA_PORT, 1, "i8042 data")
        self.add_port_device(self.i8042.command_port, I8042_COMMAND_PORT, 1, "i8042 command")
        self.rtc = CmosRtc()
        self.add_port_device(self.rtc, CMOS_PORT, CMOS_PORT_COUNT, "CMOS RTC")
        if PVPANIC_PORT <= debug_exit_port < PVPANIC_PORT + PVPANIC_PORT_SIZE:
            raise ConfigError(f"--debug-exit-port {debug_exit_port:#x} is the pvpanic port; choose another")
        self.debug_exit = DebugExit(self._guest_debug_exit, qemu_compatible=debug_exit_qemu)
        self.add_port_device(self.debug_exit, debug_exit_port, DEBUG_EXIT_PORT_SIZE, "debug-exit")
        # QEMU's ISA pvpanic, which the DSDT describes (QEMU0001): a guest kernel's panic write
        # ends the run as a panic the machine saw, no console scraping needed.
        self.pvpanic = PvPanic(self.request_stop, PVPANIC_PORT)
        self.add_port_device(self.pvpanic, PVPANIC_PORT, PVPANIC_PORT_SIZE, "pvpanic")
        self.add_sink_ports(POST_CODE_PORT, 1)
        # QEMU's fw_cfg, present by default as in QEMU: guests written for QEMU learn the CPU
        # count and RAM size there (docs/specs/fw_cfg.rst).
        e820 = [(region.gpa, region.size, 1) for region in self.memory.regions]  # 1: E820_RAM
        self.fw_cfg = FwCfg(self.memory_size, cpus, [("etc/e820", e820_file(e820))])
        self.add_port_device(self.fw_cfg, FW_CFG_PORT, FW_CFG_PORT_COUNT, "fw_cfg")
        # The ACPI fixed hardware the FADT describes (hypervisor/boot/acpi.py).
        power_off = Outcome(OutcomeKind.POWER_OFF, "the guest entered ACPI S5 (SLP_EN in PM1a_CNT)")
        reset = Outcome(OutcomeKind.RESET, "the guest reset the machine through the ACPI reset register")
        self.pm1 = pm.Pm1Registers(lambda: self.control.request_stop(power_off), on_suspend=self._suspend_requested)
        self.add_port_device(self.pm1, pm.PM1A_EVENT_PORT, pm.Pm1Registers.SIZE, "ACPI PM1a")
        self.pm_timer = pm.PmTimer()
        self.add_port_device(self.pm_timer, pm.PM_TIMER_PORT, pm.PM_TIMER_LENGTH, "ACPI PM timer")
        if pci_devices:
            self._create_pci_devices(pci_devices, lambda: self.control.request_stop(reset))
        else:
            # The reset register spans the dword at 0xcf8 it shares with PCI CONFIG_ADDRESS, and
            # CONFIG_DATA is sunk in C: a kernel built with PCI (the bundled one needs it for
            # ACPI) probes both on every boot, and an empty PCI bus is no guest error
            # (devices/pm.py).
            self.add_port_device(pm.ResetRegister(lambda: self.control.request_stop(reset)),
                                 pm.PCI_CONFIG_ADDRESS_PORT, pm.RESET_WINDOW_SIZE, "ACPI reset register")  # fmt: skip
            self.add_sink_ports(pm.PCI_CONFIG_DATA_PORT, pm.PCI_CONFIG_DATA_SIZE)
        # The PIC vector bases a PC BIOS programs (IRQ 0-7 at 0x08, 8-15 at 0x70), which real-mode
        # guests expect; KVM's in-kernel PIC starts at base 0 (hypervisor/boot/firmware_pic.py).
        bios_bases = (("KVM_IRQCHIP_PIC_MASTER", MASTER_VECTOR_BASE), ("KVM_IRQCHIP_PIC_SLAVE", SLAVE_VECTOR_BASE))
        for chip, base in bios_bases:
            self.vm.set_irqchip(chip, with_vector_base(self.vm.get_irqchip(chip), base))
        if machine_type == "qemu-test":
            self._create_qemu_test_devices(debug_exit_port)

    def _create_qemu_test_devices(self, debug_exit_port: int) -> None:
        """QEMU's isa-debug-exit at 0xf4 and pc-testdev, as kvm-unit-tests' x86/run adds them."""
        assert self.vm is not None and self.memory is not None
        from hypervisor.devices import pc_testdev as testdev

        if QEMU_DEBUG_EXIT_PORT <= debug_exit_port < QEMU_DEBUG_EXIT_PORT + QEMU_DEBUG_EXIT_SIZE:
            raise ConfigError(f"--debug-exit-port {debug_exit_port:#x} is taken by isa-debug-exit on qemu-test")
        self.qemu_debug_exit = DebugExit(self._guest_debug_exit, qemu_compatible=True)
        self.add_port_device(self.qemu_debug_exit, QEMU_DEBUG_EXIT_PORT, QEMU_DEBUG_EXIT_SIZE, "isa-debug-exit")
        scratch = testdev.ScratchRegister()
        self.add_port_device(scratch, testdev.SCRATCH_PORT, testdev.SCRATCH_PORT_COUNT, "pc-testdev ioport")
        self.add_port_device(scratch, testdev.SCRATCH_BYTE_PORT, testdev.SCRATCH_BYTE_PORT_COUNT,
                             "pc-testdev ioport-byte")  # fmt: skip
        self.add_port_device(testdev.FlushPage(testdev.HostPageFlusher(self.memory)), testdev.FLUSH_PAGE_PORT,
                             testdev.FLUSH_PAGE_PORT_COUNT, "pc-testdev flush-page")  # fmt: skip
        self.add_port_device(testdev.IrqLines(self.vm.set_irq_line), testdev.IRQ_PORT, testdev.IRQ_LINES,
                             "pc-testdev irq-line")  # fmt: skip
        self.add_mmio_device(testdev.IoMemory(), testdev.IOMEM_ADDRESS, testdev.IOMEM_SIZE, "pc-testdev iomem")

    def _create_pci_devices(self, names: Sequence[str], on_reset: Callable[[], None]) -> None:
        """A PCI bus 0 with the named devices (PCI_DEVICE_TYPES), set up as firmware leaves
        them: BARs assigned, memory decoding on, INTx routed (hypervisor/devices/pci.py)."""
        assert self.vm is not None and self.memory is not None
        from hypervisor.devices import edu, pci
        from hypervisor.devices.intel_iommu import IOMMU_ADDRESS, REGISTERS_SIZE, IntelIommu  # noqa: F811
        from hypervisor.devices.pci_routing import GuestMemoryDma, RoutedPciInterrupts

        unknown = sorted(set(names) - set(PCI_DEVICE_TYPES))
        if unknown:
            raise ConfigError(f"unknown device {unknown[0]!r}: pyhv's PCI devices are {', '.join(PCI_DEVICE_TYPES)}")
        if list(names).count("intel-iommu") > 1:
            raise ConfigError("a machine has at most one intel-iommu")
        host = pci.PciHost(on_reset)
        self.add_port_device(host, pci.CONFIG_ADDRESS_PORT, pci.CONFIG_PORTS_SIZE, "PCI host (and reset register)")
        if "intel-iommu" in names:
            self.iommu = IntelIommu(self.memory, self.vm.signal_msi)
            self.add_mmio_device(self.iommu, IOMMU_ADDRESS, REGISTERS_SIZE, "intel-iommu")
        dma = self.iommu or GuestMemoryDma(self.memory)
        functions = [name for name in names if name != "intel-iommu"]
        if len(functions) > MAX_PCI_FUNCTIONS:
            raise ConfigError(f"at most {MAX_PCI_FUNCTIONS} PCI devices besides the intel-iommu")
        for index, _name in enumerate(functions):  # only edu so far
            slot = FIRST_PCI_SLOT + index
            gsi = PCI_FIRST_GSI - index  # from the IOAPIC's last input down, below virtio-mmio's
            bar = PCI_BAR_WINDOW + index * edu.BAR_SIZE
            source_id = pci.devfn(slot)
            interrupts = RoutedPciInterrupts(self.vm, gsi, source_id, self.iommu)
            device = edu.EduDevice(dma, interrupts, source_id, bar, gsi)
            host.attach(slot, device)
            self.add_mmio_device(device, bar, edu.BAR_SIZE, f"edu 00:{slot:02x}.0 BAR 0")
            self._pci_gsis.add(gsi)

    def _create_vcpus(self, count: int) -> None:
        assert self.vm is not None and self.kvm is not None
        cpuid = self.kvm.supported_cpuid()
        on_pvm = kvm_is_pvm()
        for index in range(count):
            vcpu = self.vm.create_vcpu(index)
            # On kvm_pvm a hypercall from emulated CPL0 hangs the vCPU: offer no PV feature that
            # makes the guest issue one (docs/booting.md).
            vcpu.set_cpuid(guest_cpuid(cpuid, index, count, hide_hypercall_features=on_pvm))
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
        from hypervisor.virtio.worker import QueueWorker

        windows = []
        for spec in disks:
            index = len(self.disks)
            name = "vd" + chr(ord("a") + index)
            window = virtio_mmio_window(index)
            if window.irq in self._pci_gsis:
                raise ConfigError(f"{name}: its IRQ {window.irq} is taken by a PCI device; use fewer disks or devices")
            if spec.throwaway:
                # The guest must never write to a snapshot=on/overlay= base: the overlay is made by
                # hypervisor.disk_overlays.DiskSession, which hands this method the overlay instead.
                raise ConfigError(f"{name}: {spec.path} asks for an overlay; open it through DiskSession")
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
            # The disk's I/O thread, started with the vCPUs (`start`) and joined in `close`.
            worker = QueueWorker(name, transport.queue_count, transport.process_queue, transport.has_pending,
                                 set_notifications=transport.set_notifications)
            transport.use_worker(worker)
            self.disks.append(AttachedDisk(name, spec, transport, interrupt, worker))
            self.add_mmio_device(transport, window.gpa, window.size, name)
            for queue in range(transport.queue_count):
                self.vm.register_ioeventfd(worker.eventfd(queue), window.gpa + QUEUE_NOTIFY_OFFSET, 4, datamatch=queue)
            log.info("%s: %s (%s%s) at %#x, IRQ %d", name, spec.path, backend.__class__.__name__,
                     ", read-only" if spec.read_only else "", window.gpa, window.irq)  # fmt: skip
            windows.append(window)
        return windows

    @staticmethod
    def swap_disk_backend(device: VirtioBlock, backend: BlockBackend) -> None:
        """Puts `backend` under `device` in place of the image it used, keeping the shims
        `attach_disks` put around it (write sets, faults: each shim has an `inner`), so what
        they recorded goes on; the device's I/O must be stopped (a snapshot's freeze)."""
        holder: object = device
        current = device.backend
        while hasattr(current, "inner"):
            holder, current = current, current.inner
        if holder is device:
            device.replace_backend(backend)
            return
        if backend.size != current.size or backend.read_only != current.read_only:
            raise ConfigError(f"{device.name}: the replacement disk differs in size or read-only mode")
        holder.inner = backend  # type: ignore[attr-defined]

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
        for watcher in list(self.output_watchers):
            try:
                watcher(data)
            except Exception:  # a broken watcher (a closed stderr) must not take the vCPU thread down
                log.exception("output watcher %r failed; removing it", watcher)
                with contextlib.suppress(ValueError):  # another vCPU's output met the failure first
                    self.output_watchers.remove(watcher)
        if self.console is not None:
            self.console.write(data)

    # -- ACPI S3, suspend to RAM (ACPI 6.5 §7.4.2.4, §16.1.3; devices/pm.py) ----------------------

    @property
    def asleep(self) -> bool:
        """Suspended to RAM (S3), waiting for its wake event."""
        return self._asleep_until is not None

    def _suspend_requested(self) -> None:
        """On the vCPU that wrote SLP_EN: every vCPU parks before its next instruction (the
        kick is taken before KVM_RUN), and the main thread puts the machine to sleep."""
        self.control.pause(wait=False, owner=S3_PAUSE)
        self.call_from_main_thread(self._enter_s3)

    def _enter_s3(self) -> None:
        if not self.control.pause(wait=True, timeout=10, owner=S3_PAUSE):
            log.error("S3: the vCPUs did not stop within 10 s; the machine stays paused")
        wake = self.rtc.next_alarm(time.time()) if self.pm1.rtc_wake_enabled() else None
        self._asleep_until = float("inf") if wake is None else wake
        if wake is None:
            log.warning("the guest suspended to RAM (S3) with no wake source (RTC_EN and the RTC's "
                        "alarm interrupt): it sleeps until the run ends")  # fmt: skip
        else:
            log.info("the guest suspended to RAM (S3); the RTC alarm wakes it in %.2f s", wake - time.time())

    def _wake_from_s3(self) -> None:
        """What firmware does on an S3 resume: the BSP starts in real mode at the FACS waking
        vector (§5.2.10: CS = vector >> 4, IP = vector & 0xF, the same linear address), the APs
        wait for a SIPI, PM1_STS says WAK_STS and RTC_STS, the RTC says its alarm fired. RAM and
        the devices are as the guest left them."""
        from hypervisor.boot.acpi import FACS_WAKING_VECTOR_OFFSET, facs_address
        from hypervisor.boot.cpu_state import real_mode_state
        from hypervisor.kvm.vcpu import MP_STATE_INIT_RECEIVED, MP_STATE_RUNNABLE

        assert self.memory is not None
        self._asleep_until = None
        facs = facs_address()
        vector = 0
        if self.memory.contains(facs, 64) and self.memory.read(facs, 4) == b"FACS":
            vector = self.memory.read_u32(facs + FACS_WAKING_VECTOR_OFFSET)
        if not vector:
            # Firmware with no waking vector boots the machine again; pyhv ends the run instead.
            self.control.request_stop(Outcome(OutcomeKind.RESET, "woke from S3 with no FACS waking vector"))
        else:
            log.info("waking from S3 at the FACS waking vector %#x", vector)
            self.vcpus[0].set_mp_state(MP_STATE_RUNNABLE)  # in case it had halted
            self.set_entry_state(real_mode_state(vector), 0)
            for vcpu in self.vcpus[1:]:
                vcpu.set_mp_state(MP_STATE_INIT_RECEIVED)
            self.pm1.woke(by_rtc=True)
            self.rtc.alarm_fired()
        self.control.resume(owner=S3_PAUSE)

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
        pio = [TableRange(r.base, r.size, r.device_id, uart=r.device is self.serial)
               for r in self.pio_bus.ranges() if r.device_id not in sink_ids]  # fmt: skip
        pio += self._sinks
        mmio = [TableRange(r.base, r.size, r.device_id) for r in self.mmio_bus.ranges()]
        for vcpu in self.vcpus:
            vcpu.set_range_tables(pio, mmio)
        if self._serial_fast_path_wanted and self.uart_buffer is None:
            from hypervisor.kvm.uart import UartTransmitBuffer

            self.uart_buffer = UartTransmitBuffer()
            for vcpu in self.vcpus:
                vcpu.attach_uart(self.uart_buffer)
            self.serial.attach_fast_path(self.uart_buffer)

    def start(self, paused: bool = False) -> None:
        """Starts the vCPU threads (and the console); `wait` collects the outcome. With `paused`,
        every vCPU parks before its first instruction until `resume()` (a debugger attaches)."""
        if self._threads:
            # A second start would run a second thread on every vCPU: the two share one kvm_run
            # and one kick, so a pause waits for threads that never park and close() hangs.
            raise RuntimeError("this machine was already started; start() runs once per machine")
        if paused:
            self.control.pause(wait=False)  # held by "user" until resume()
        # A machine started for a debugger, a tracer, a post-mortem history or an output
        # watcher that acts on the guest (--save-on, a console-triggered --fault rule: the guest
        # must stop right after the pattern, not at the end of its line) sees every exit in
        # Python for the whole run; otherwise only while a hook or breakpoint exists.
        self._observed_from_start = (paused or self.exit_history is not None or bool(self.exit_hooks)
                                     or bool(self.output_watchers))  # fmt: skip
        self.install_range_tables()
        self._observers_changing(False)
        for disk in self.disks:
            disk.worker.start()
        if self.console is not None:
            quit_outcome = Outcome(OutcomeKind.QUIT, "quit from the console")
            # The console thread types through the UART's feed(), which takes the device's bus
            # lock as a vCPU's access does (hypervisor.devices.gate).
            self.console.start(self.serial.feed, lambda: self.request_stop(quit_outcome))
        self._started_at = time.monotonic()
        self.observer.restart_clock()
        for vcpu in self.vcpus:
            runner = VcpuRunner(vcpu, self.pio_bus, self.mmio_bus, self.control, self.emulator,
                                hooks=self.exit_hooks, breakpoints=self.breakpoints, history=self.exit_history,
                                memory=self.memory, machine=self,
                                flush_uart=self.serial.flush_fast_path)  # fmt: skip
            self.runners.append(runner)
            self.control.thread_started(vcpu.id)  # counted live before it runs: see pause()
            thread = threading.Thread(target=self._vcpu_thread, args=(runner,), name=f"vcpu{vcpu.id}", daemon=True)
            self._threads.append(thread)
            thread.start()

    @staticmethod
    def _vcpu_thread(runner: VcpuRunner) -> None:
        # Terminal signals belong to the main thread, which turns them into an outcome; a vCPU
        # thread only ever sees the kick signal.
        block_terminal_signals()
        runner.run()

    def wait(self, timeout: float | None = None) -> RunResult:
        deadline = None if timeout is None else self._started_at + timeout
        exits_seen, quiet_since = self._exit_count(), time.monotonic()
        probe_after = HALT_PROBE_SECONDS
        try:
            while not self.control.finished.is_set():
                now = time.monotonic()
                remaining = None if deadline is None else deadline - now
                if remaining is not None and remaining <= 0:
                    self.control.request_stop(Outcome(OutcomeKind.TIMEOUT, f"no outcome within {timeout:g} s"))
                    break
                self.control.finished.wait(0.25 if remaining is None else min(remaining, 0.25))
                self.serial.flush_fast_path(wait=False)  # a prompt without a newline
                self._run_main_thread_calls()
                if self._asleep_until is not None and time.time() >= self._asleep_until:
                    self._wake_from_s3()
                over_budget = self.exit_budget.check(self.vcpus) if self.exit_budget is not None else None
                if over_budget is not None:
                    self.control.request_stop(over_budget)
                exits = self._exit_count()
                if exits != exits_seen or self.control.paused:
                    exits_seen, quiet_since, probe_after = exits, time.monotonic(), HALT_PROBE_SECONDS
                elif time.monotonic() - quiet_since >= probe_after:
                    self._probe_for_final_halt()
                    # A guest that computes for long without exits (a kernel unpacking its
                    # initramfs) is probed less and less often: each probe kicks its vCPUs.
                    probe_after = min(probe_after * 2, HALT_PROBE_MAX_SECONDS)
                    exits_seen, quiet_since = self._exit_count(), time.monotonic()
        except KeyboardInterrupt:
            self.control.request_stop(Outcome(OutcomeKind.INTERRUPTED, "interrupted on the host"))
        wall = time.monotonic() - self._started_at
        self._join_threads()
        self.serial.flush_fast_path(wait=False)  # the last bytes, before the console is read
        outcome = self.control.outcome
        assert outcome is not None
        outcome = self.observer.explain(outcome)
        per_vcpu = [vcpu_statistics(vcpu) for vcpu in self.vcpus]
        # COM1 accesses the C loop served (counted among the exits handled in C).
        uart = self.uart_buffer
        statistics = merge_statistics(per_vcpu, uart.bytes_taken if uart else 0, uart.line_status_reads if uart else 0)
        self._warn_about_unmapped(statistics)
        reports = self.observer.kernel_log.reports.to_dict() if self.observer.linux_rules else None
        return RunResult(outcome, wall, statistics, per_vcpu, reports)

    def run(self, timeout: float | None = None) -> RunResult:
        """Runs the guest until it stops (or `timeout` seconds pass) and returns the result."""
        self.start()
        return self.wait(timeout)

    def call_from_main_thread(self, function: Callable[[], None]) -> None:
        """Runs `function` on the thread in `wait()` soon (within a quarter second): for work a
        vCPU thread must not do itself, such as a save that pauses every vCPU."""
        self._main_thread_calls.append(function)

    def _run_main_thread_calls(self) -> None:
        while self._main_thread_calls:
            function = self._main_thread_calls.pop(0)
            try:
                function()
            except HypervisorError as error:
                log.error("%s", error)

    # -- snapshots (hypervisor.snapshot; docs/snapshots.md) --------------------------------------

    def save(self, path: str) -> None:
        """Saves the running (or paused) machine to the folder `path`; the run goes on."""
        from hypervisor.snapshot.machine_state import save_machine

        save_machine(self, path)

    @classmethod
    def restore(cls, path: str, console: Console | None = None, *, verify_memory: bool = True,
                disk_overlay: str | None = None) -> Machine:  # fmt: skip
        """A machine rebuilt from the snapshot folder `path`, ready to `run()` on from where it
        was saved. Refuses (ConfigError, exit 3) a damaged, foreign or incompatible snapshot.
        Each disk gets a fresh overlay on its frozen image in the folder `disk_overlay` (None: a
        temporary folder removed at close)."""
        from hypervisor.snapshot.machine_state import restore_machine

        return restore_machine(cls, path, console, verify_memory=verify_memory, disk_overlay=disk_overlay)

    def _exit_count(self) -> int:
        return sum(vcpu.run_calls for vcpu in self.vcpus)

    def exit_count(self) -> int:
        """VM exits so far, all vCPUs (KVM_RUN returns); safe to call from any thread while running."""
        return self._exit_count()

    def _probe_for_final_halt(self) -> None:
        """Ends the run when every vCPU is halted with interrupts masked and nothing pending.

        With the in-kernel LAPIC a HLT never reaches user space (KVM blocks the vCPU in KVM_RUN),
        so `cli; hlt` -- a kernel decompressor's "System halted", a panic with panic=0 -- would
        otherwise hang until --timeout. Nothing can wake such a vCPU: maskable interrupts need
        RFLAGS.IF (SDM Vol. 3 §6.8.1) and no pyhv device raises NMI, INIT or SIPI, so a machine
        whose every vCPU is in that state is finished. The probe pauses the vCPUs (a kick each),
        reads their state, and resumes them when any can still run.
        """
        if self.control.paused:
            return  # somebody (a debugger) holds the machine: nothing to probe
        owner = "internal:halt-probe"
        if not self.control.pause(wait=True, timeout=1.0, owner=owner):
            self.control.resume(owner)
            return
        try:
            halted = []
            for vcpu in self.vcpus:
                regs = vcpu.get_regs()
                if vcpu.get_mp_state() != MP_STATE_HALTED or regs["rflags"] & RFLAGS_IF:
                    return
                if vcpu.get_vcpu_events().anything_pending:
                    return
                halted.append(f"vcpu{vcpu.id} at rip {regs['rip']:#x}")
            self.control.request_stop(
                Outcome(OutcomeKind.HALTED, "the guest halted with interrupts disabled (" + ", ".join(halted) + ")")
            )
        except HypervisorError as error:
            log.debug("halt probe failed: %s", error)
        finally:
            self.control.resume(owner)

    # -- the debugging contract (docs/debugging.md) -----------------------------------------

    def add_exit_hook(self, hook: ExitHook) -> None:
        """`hook(event, ctx)` for every real exit that reaches Python, on the vCPU's thread,
        after the device served it (hypervisor.vcpu.context.ExitContext)."""
        self._observers_changing(True)
        self.exit_hooks.append(hook)

    def remove_exit_hook(self, hook: ExitHook) -> None:
        self.exit_hooks.remove(hook)
        self._observers_changing(False)

    def _observers_changing(self, adding: bool) -> None:
        """Keeps COM1's C path off while anything observes exits (a breakpoint on port 0x3f8
        counts every write); called before an observer is added and after one goes."""
        if self.uart_buffer is not None:
            observed = adding or self._observed_from_start or bool(self.exit_hooks) or len(self.breakpoints) > 0
            self.serial.allow_fast_path(not observed)

    def break_on(
        self,
        kind: str | None = None,
        *,
        port: int | tuple[int, int] | None = None,
        address: int | tuple[int, int] | None = None,
        is_write: bool | None = None,
        size: int | None = None,
        data: int | None = None,
        vcpu: int | None = None,
        count: int | None = None,
        condition: Condition | None = None,
        action: Action | None = None,
    ) -> Breakpoint:
        """An exit breakpoint (hypervisor.vcpu.breakpoints): `break_on("io", port=0x3f8,
        is_write=True, count=3)` stops the machine at the third and every later write to COM1."""
        if port is not None and address is not None:
            raise ValueError("give port or address, not both")
        if port is not None:
            if kind not in (None, "io"):
                raise ValueError(f"a port applies to io exits, not {kind}")
            kind, address = "io", port
        return self.breakpoints.add(Breakpoint(kind, address, is_write, size, data, vcpu, count, condition, action))

    def delete_breakpoint(self, breakpoint_id: int) -> bool:
        return self.breakpoints.delete(breakpoint_id)

    def pause(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Parks every vCPU outside KVM_RUN; with `wait`, returns once each has acknowledged
        (True), or False after `timeout` seconds. Registers and memory are then consistent."""
        return self.control.pause(wait, timeout)

    def resume(self) -> None:
        self.control.resume()

    @property
    def paused(self) -> bool:
        return self.control.paused

    def step_exit(self, vcpu_index: int = 0, timeout: float | None = None) -> ExitEvent | None:
        """While paused: runs one vCPU to its next exit that reaches Python, lets its device
        handle it, parks it again and returns the event (None: the run ended or `timeout`)."""
        return self.control.step(self.vcpus[vcpu_index], timeout)

    def wait_for_stop(self, timeout: float | None = None) -> Stop | None:
        """The next reason the machine stopped (breakpoint, debug trap, hook, end of run)."""
        return self.control.wait_for_stop(timeout)

    @property
    def last_step_stop(self) -> Stop | None:
        """A breakpoint or debug trap the last `step_exit` met (it answers the step)."""
        return self.control.last_step_stop

    def stuck_vcpu_threads(self) -> list[str]:
        """Names of vCPU threads still alive after the run (their registers are not final)."""
        return [thread.name for thread in self._threads if thread.is_alive()]

    def _join_threads(self) -> None:
        for thread in self._threads:
            thread.join(STOP_GRACE_SECONDS)
            if thread.is_alive():
                log.error("vCPU thread %s did not stop within %g s", thread.name, STOP_GRACE_SECONDS)

    @staticmethod
    def _warn_about_unmapped(statistics: RunStatistics) -> None:
        ports = statistics["pio_unmapped_reads"] + statistics["pio_unmapped_writes"]
        if ports:
            log.warning(
                "the guest made %d accesses to ports with no device (first at %#x): reads "
                "returned 0xff, writes were ignored",
                ports,
                statistics["first_unmapped_port"],
            )
        mmio = statistics["mmio_unmapped_reads"] + statistics["mmio_unmapped_writes"]
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
        if self._threads:
            self._join_threads()
        if self.console is not None:
            try:
                self.console.close()
            except HypervisorError:
                log.exception("closing the console failed")
        stuck = self.stuck_vcpu_threads()
        if stuck:
            # A vCPU thread that is still alive may be inside KVM_RUN with kvm_run mapped, or in
            # a device with guest memory in hand: unmapping either under it would crash the
            # process. Leak them instead (the process is going away or the user is told).
            log.error("vCPU threads %s did not stop; keeping their VM and memory mapped", ", ".join(stuck))
            return
        # Then the I/O threads: each finishes the requests it took (they write guest memory)
        # and is joined. One that does not stop is in a request with guest memory in hand:
        # as for a stuck vCPU, keep everything mapped.
        stuck_io = [disk.name for disk in self.disks if not disk.worker.stop()]
        if stuck_io:
            log.error("I/O threads of %s did not stop; keeping their VM and memory mapped", ", ".join(stuck_io))
            return
        # Devices go before guest memory: their rings hold views of it.
        for disk in self.disks:
            disk.worker.close()
            disk.transport.close()
            disk.interrupt.close()
        if self.vm is not None:
            self.vm.close()
        if self.uart_buffer is not None:
            self.uart_buffer.close()  # no vCPU loop points at it any more
        if self.memory is not None:
            self.memory.close()
        if self.kvm is not None:
            self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
