"""What a device made of one port or MMIO access, as a short string (`serial THR 'L'`).

Pure functions of the exit event (the bus range's name, the offset, direction and data) and, where
the meaning depends on device state, a read-only peek at the device object (the UART's DLAB, the
CMOS index latch, the virtio transport's QueueSel). Nothing here changes a device: a trace or a
post-mortem must not perturb the guest it observes. Hooks run after the device served the access,
so a peeked state is the state after it; that only matters for the register that changes it
(an LCR write sets DLAB), which is named by its own offset.

Each family answers a `Meaning`: the family ("serial"), the register ("THR") and the detail
("'L'"); `str()` joins them. The trace summary groups by (device, register).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from hypervisor.devices import fw_cfg as fw_cfg_keys
from hypervisor.devices import i8042 as kbc
from hypervisor.devices import pm
from hypervisor.vcpu.events import ExitEvent, MmioAccess, PortIo
from hypervisor.virtio import mmio_registers as vreg


class Meaning(NamedTuple):
    family: str  # "serial", "cmos", "virtio-blk vda", ...
    register: str  # "THR", "index", "QueueNotify", ...
    detail: str = ""  # "'L'", "0x0a", "queue 0 notify"

    def __str__(self) -> str:
        return " ".join(part for part in (self.family, self.register, self.detail) if part)


Access = PortIo | MmioAccess
Describer = Callable[[Access, object], Meaning]


def _value(data: bytes) -> int:
    return int.from_bytes(data, "little")


def _hex(data: bytes) -> str:
    """The accessed value, zero-padded to the access width: 0x0a, 0x0019, 0x00000001."""
    return f"{_value(data):#0{2 + 2 * len(data)}x}" if data else "-"


def _rw(event: Access, register: str, family: str) -> Meaning:
    """`register 0x03` for a write, `register -> 0x60` for a read."""
    return Meaning(family, register, _hex(event.data) if event.is_write else f"-> {_hex(event.data)}")


# -- 16550A UART (PC16550D data sheet, Table II "Register Summary") --------------------------------

_UART_READ = ("RBR", "IER", "IIR", "LCR", "MCR", "LSR", "MSR", "SCR")
_UART_WRITE = ("THR", "IER", "FCR", "LCR", "MCR", "LSR", "MSR", "SCR")
_LCR_DLAB = 0x80  # LCR bit 7: offsets 0 and 1 become the divisor latch DLL/DLM


def _uart_dlab(device: object) -> bool | None:
    """The divisor latch access bit, read without touching the UART; None when unknown."""
    public = getattr(device, "divisor_latch_enabled", None)
    if isinstance(public, bool):
        return public
    lcr = getattr(device, "_lcr", None)
    return bool(lcr & _LCR_DLAB) if isinstance(lcr, int) else None


def _char(data: bytes) -> str:
    """Transmitted bytes as a quoted string with escapes: 'L', '\\n', 'ab'."""
    return repr(data.decode("latin-1"))


def describe_uart(event: Access, device: object) -> Meaning:
    offset = event.offset
    if not 0 <= offset < len(_UART_READ):
        return Meaning("serial", f"+{offset:#x}", _hex(event.data))
    if offset <= 1:
        dlab = _uart_dlab(device)
        if dlab:
            return _rw(event, ("DLL", "DLM")[offset], "serial")
        if dlab is None:  # no device to ask (an exit history): both names, and the byte as text
            name = ("THR/DLL" if event.is_write else "RBR/DLL") if offset == 0 else "IER/DLM"
            meaning = _rw(event, name, "serial")
            return meaning._replace(detail=f"{meaning.detail} ({_char(event.data)})") if offset == 0 else meaning
    if offset == 0 and event.is_write:
        return Meaning("serial", "THR", _char(event.data))
    if offset == 0 and event.data:
        return Meaning("serial", "RBR", f"-> {_char(event.data)}")
    return _rw(event, (_UART_WRITE if event.is_write else _UART_READ)[offset], "serial")


# -- CMOS RTC (MC146818A: index at 0x70, data at 0x71) ---------------------------------------------

_CMOS_NMI_DISABLE = 0x80
_CMOS_INDEX_MASK = 0x7F


def describe_cmos(event: Access, device: object) -> Meaning:
    if event.offset == 0:
        if not event.is_write:
            return _rw(event, "index", "cmos")
        value = _value(event.data[:1])
        text = f"{value & _CMOS_INDEX_MASK:#04x}" + (" (NMI off)" if value & _CMOS_NMI_DISABLE else "")
        return Meaning("cmos", "index", text)
    if event.offset == 1:
        index = getattr(device, "_index", None)
        register = f"data[{index:#04x}]" if isinstance(index, int) else "data"
        return _rw(event, register, "cmos")
    return Meaning("cmos", f"+{event.offset:#x}", _hex(event.data))


# -- i8042 keyboard controller (ports 0x60 and 0x64) -----------------------------------------------

_I8042_COMMANDS = {
    kbc.CMD_READ_COMMAND_BYTE: "read command byte",
    kbc.CMD_WRITE_COMMAND_BYTE: "write command byte",
    kbc.CMD_DISABLE_AUX: "disable aux",
    kbc.CMD_ENABLE_AUX: "enable aux",
    kbc.CMD_TEST_AUX: "test aux",
    kbc.CMD_SELF_TEST: "self-test",
    kbc.CMD_TEST_KEYBOARD: "test keyboard",
    kbc.CMD_DISABLE_KEYBOARD: "disable keyboard",
    kbc.CMD_ENABLE_KEYBOARD: "enable keyboard",
    kbc.CMD_READ_INPUT_PORT: "read input port",
    kbc.CMD_READ_OUTPUT_PORT: "read output port",
    kbc.CMD_WRITE_OUTPUT_PORT: "write output port",
    kbc.CMD_WRITE_KEYBOARD_OUTPUT: "write keyboard output",
    kbc.CMD_WRITE_AUX_OUTPUT: "write aux output",
    kbc.CMD_WRITE_TO_AUX: "write to aux",
    kbc.CMD_PULSE_RESET: "pulse reset",
}


def describe_i8042(event: Access, device: object) -> Meaning:
    if event.device is not None and "command" in event.device:
        if not event.is_write:
            return _rw(event, "status", "i8042")
        command = _value(event.data[:1])
        name = _I8042_COMMANDS.get(command)
        return Meaning("i8042", "command", f"{command:#04x}" + (f" ({name})" if name else ""))
    return _rw(event, "data", "i8042")


# -- debug-exit (pyhv's, and QEMU's isa-debug-exit: hw/misc/debugexit.c) --------------------------


def describe_debug_exit(event: Access, device: object) -> Meaning:
    if not event.is_write or not event.data:
        return _rw(event, "read", "debug-exit")
    value = event.data[0]
    qemu = getattr(device, "qemu_compatible", None)
    if qemu is None:
        qemu = event.device == "isa-debug-exit"
    status = ((value << 1) | 1) & 0xFF if qemu else value
    return Meaning("debug-exit", "status", str(status))


# -- QEMU fw_cfg (docs/specs/fw_cfg.rst: selector at +0, data at +1) ------------------------------

_FW_CFG_KEYS = {
    fw_cfg_keys.FW_CFG_SIGNATURE: "SIGNATURE",
    fw_cfg_keys.FW_CFG_ID: "ID",
    fw_cfg_keys.FW_CFG_UUID: "UUID",
    fw_cfg_keys.FW_CFG_RAM_SIZE: "RAM_SIZE",
    fw_cfg_keys.FW_CFG_NOGRAPHIC: "NOGRAPHIC",
    fw_cfg_keys.FW_CFG_NB_CPUS: "NB_CPUS",
    fw_cfg_keys.FW_CFG_BOOT_MENU: "BOOT_MENU",
    fw_cfg_keys.FW_CFG_MAX_CPUS: "MAX_CPUS",
    fw_cfg_keys.FW_CFG_FILE_DIR: "FILE_DIR",
    fw_cfg_keys.FW_CFG_IRQ0_OVERRIDE: "IRQ0_OVERRIDE",
}


def describe_fw_cfg(event: Access, device: object) -> Meaning:
    if event.offset == fw_cfg_keys.SELECTOR_OFFSET:
        if not event.is_write:
            return _rw(event, "selector", "fw_cfg")
        key = _value(event.data)
        name = _FW_CFG_KEYS.get(key) or (f"file {key - fw_cfg_keys.FW_CFG_FILE_FIRST}"
                                         if key >= fw_cfg_keys.FW_CFG_FILE_FIRST else "")  # fmt: skip
        return Meaning("fw_cfg", "select", _hex(event.data) + (f" ({name})" if name else ""))
    if event.offset == fw_cfg_keys.DATA_OFFSET:
        return _rw(event, "data", "fw_cfg")
    return Meaning("fw_cfg", f"+{event.offset:#x}", _hex(event.data))


# -- ACPI fixed hardware (ACPI 6.5 §4.8.3) ----------------------------------------------------------

_PM1_REGISTERS = {0: "PM1_STS", 1: "PM1_STS", 2: "PM1_EN", 3: "PM1_EN", 4: "PM1_CNT", 5: "PM1_CNT"}
_PM1_CONTROL_OFFSET = pm.PM1A_CONTROL_PORT - pm.PM1A_EVENT_PORT


def describe_pm1(event: Access, device: object) -> Meaning:
    register = _PM1_REGISTERS.get(event.offset, f"+{event.offset:#x}")
    meaning = _rw(event, register, "acpi")
    if register == "PM1_CNT" and event.is_write and event.offset == _PM1_CONTROL_OFFSET:
        value = _value(event.data)
        sleep_type = (value & pm.SLP_TYP_MASK) >> pm.SLP_TYP_SHIFT
        if value & pm.SLP_EN:
            state = "S5" if sleep_type == pm.S5_SLEEP_TYPE else f"SLP_TYP {sleep_type}"
            return meaning._replace(detail=f"{meaning.detail} (SLP_EN {state})")
    return meaning


def describe_pm_timer(event: Access, device: object) -> Meaning:
    return _rw(event, "PM_TMR", "acpi")


def describe_reset_register(event: Access, device: object) -> Meaning:
    if not pm.is_reset_register_access(event.offset, event.size):
        # The PCI CONFIG_ADDRESS dword the reset register sits in (devices/pm.py docstring).
        meaning = _rw(event, "CONFIG_ADDRESS", "pci")
        return meaning._replace(detail=f"{meaning.detail} (no PCI host bridge)")
    meaning = _rw(event, "RESET_REG", "acpi")
    if event.is_write and event.data and event.data[0] & pm.RESET_CPU_BIT:
        return meaning._replace(detail=f"{meaning.detail} (reset)")
    return meaning


# -- PCI configuration mechanism #1 (PCI Local Bus 3.0 §3.2.2.3.2), edu, VT-d --------------------


def describe_pci_host(event: Access, device: object) -> Meaning:
    if pm.is_reset_register_access(event.offset, event.size):
        return describe_reset_register(event, device)
    if event.offset == 0 and event.size == 4:
        meaning = _rw(event, "CONFIG_ADDRESS", "pci")
        address = _value(event.data)
        if event.is_write and address >> 31:
            bus, slot, function = (address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 7
            target = f"{bus:02x}:{slot:02x}.{function} register {address & 0xFF:#04x}"
            return meaning._replace(detail=f"{meaning.detail} ({target})")
        return meaning
    if event.offset >= 4:
        return _rw(event, f"CONFIG_DATA+{event.offset - 4}" if event.offset > 4 else "CONFIG_DATA", "pci")
    return _rw(event, f"+{event.offset:#x}", "pci")


_EDU_REGISTERS = {0x00: "ID", 0x04: "LIVENESS", 0x08: "FACTORIAL", 0x20: "STATUS", 0x24: "INTR_STATUS",
                  0x60: "INTR_RAISE", 0x64: "INTR_ACK", 0x80: "DMA_SRC", 0x88: "DMA_DST", 0x90: "DMA_COUNT",
                  0x98: "DMA_CMD"}  # fmt: skip


def describe_edu(event: Access, device: object) -> Meaning:
    return _rw(event, _EDU_REGISTERS.get(event.offset, f"+{event.offset:#x}"), "edu")


_VTD_REGISTERS = {0x00: "VER", 0x08: "CAP", 0x0C: "CAP_HI", 0x10: "ECAP", 0x14: "ECAP_HI", 0x18: "GCMD",
                  0x1C: "GSTS", 0x20: "RTADDR", 0x24: "RTADDR_HI", 0x28: "CCMD", 0x2C: "CCMD_HI", 0x34: "FSTS",
                  0x38: "FECTL", 0x3C: "FEDATA", 0x40: "FEADDR", 0x44: "FEUADDR", 0x80: "IQH", 0x88: "IQT",
                  0x90: "IQA", 0x94: "IQA_HI", 0x9C: "ICS", 0xA0: "IECTL", 0xA4: "IEDATA", 0xA8: "IEADDR",
                  0xAC: "IEUADDR", 0xB8: "IRTA", 0xBC: "IRTA_HI", 0x200: "IVA", 0x208: "IOTLB",
                  0x20C: "IOTLB_HI", 0x220: "FRCD", 0x228: "FRCD_HI", 0x22C: "FRCD_F"}  # fmt: skip


def describe_intel_iommu(event: Access, device: object) -> Meaning:
    return _rw(event, _VTD_REGISTERS.get(event.offset, f"+{event.offset:#x}"), "vt-d")


# -- virtio-mmio (virtio 1.2 §4.2.2, Table "MMIO Device Register Layout") ---------------------------

VIRTIO_MMIO_REGISTERS = {
    vreg.MAGIC_VALUE_OFFSET: "MagicValue",
    vreg.VERSION_OFFSET: "Version",
    vreg.DEVICE_ID_OFFSET: "DeviceID",
    vreg.VENDOR_ID_OFFSET: "VendorID",
    vreg.DEVICE_FEATURES_OFFSET: "DeviceFeatures",
    vreg.DEVICE_FEATURES_SEL_OFFSET: "DeviceFeaturesSel",
    vreg.DRIVER_FEATURES_OFFSET: "DriverFeatures",
    vreg.DRIVER_FEATURES_SEL_OFFSET: "DriverFeaturesSel",
    vreg.QUEUE_SEL_OFFSET: "QueueSel",
    vreg.QUEUE_NUM_MAX_OFFSET: "QueueNumMax",
    vreg.QUEUE_NUM_OFFSET: "QueueNum",
    vreg.QUEUE_READY_OFFSET: "QueueReady",
    vreg.QUEUE_NOTIFY_OFFSET: "QueueNotify",
    vreg.INTERRUPT_STATUS_OFFSET: "InterruptStatus",
    vreg.INTERRUPT_ACK_OFFSET: "InterruptACK",
    vreg.STATUS_OFFSET: "Status",
    vreg.QUEUE_DESC_LOW_OFFSET: "QueueDescLow",
    vreg.QUEUE_DESC_HIGH_OFFSET: "QueueDescHigh",
    vreg.QUEUE_DRIVER_LOW_OFFSET: "QueueDriverLow",
    vreg.QUEUE_DRIVER_HIGH_OFFSET: "QueueDriverHigh",
    vreg.QUEUE_DEVICE_LOW_OFFSET: "QueueDeviceLow",
    vreg.QUEUE_DEVICE_HIGH_OFFSET: "QueueDeviceHigh",
    vreg.SHM_SEL_OFFSET: "SHMSel",
    vreg.SHM_LEN_LOW_OFFSET: "SHMLenLow",
    vreg.SHM_LEN_LOW_OFFSET + 4: "SHMLenHigh",
    vreg.SHM_BASE_HIGH_OFFSET - 4: "SHMBaseLow",
    vreg.SHM_BASE_HIGH_OFFSET: "SHMBaseHigh",
    0x0C0: "QueueReset",  # virtio 1.2 §4.2.2: VIRTIO_F_RING_RESET
    vreg.CONFIG_GENERATION_OFFSET: "ConfigGeneration",
}
# virtio 1.2 §5 "Device Types": the DeviceID a transport reports, as the family name.
_VIRTIO_TYPES = {1: "virtio-net", 2: "virtio-blk", 3: "virtio-console", 4: "virtio-rng"}
_STATUS_BITS = (
    (1, "ACKNOWLEDGE"),
    (2, "DRIVER"),
    (4, "DRIVER_OK"),
    (8, "FEATURES_OK"),
    (64, "DEVICE_NEEDS_RESET"),
    (128, "FAILED"),
)  # fmt: skip  (§2.1)


def _virtio_family(event: Access, device: object) -> str:
    inner = getattr(device, "device", None)
    kind = _VIRTIO_TYPES.get(int(getattr(inner, "device_id", 0) or 0), "virtio")
    return f"{kind} {event.device}" if event.device else kind


def describe_virtio_mmio(event: Access, device: object) -> Meaning:
    family = _virtio_family(event, device)
    offset = event.offset
    if offset >= vreg.CONFIG_OFFSET:
        return _rw(event, f"config+{offset - vreg.CONFIG_OFFSET:#x}", family)
    register = VIRTIO_MMIO_REGISTERS.get(offset, f"+{offset:#x}")
    if register == "QueueNotify" and event.is_write:
        return Meaning(family, register, f"queue {_value(event.data)} notify")
    if register in ("QueueSel", "QueueNum", "QueueReady") and event.is_write:
        return Meaning(family, register, str(_value(event.data)))
    if register == "Status" and event.is_write:
        value = _value(event.data)
        names = [name for bit, name in _STATUS_BITS if value & bit]
        return Meaning(family, register, f"{_hex(event.data)} ({'|'.join(names) or 'reset'})")
    return _rw(event, register, family)


def describe_generic(event: Access, device: object) -> Meaning:
    name = event.device or ("unmapped port" if isinstance(event, PortIo) else "unmapped mmio")
    return _rw(event, f"+{event.offset:#x}", name)


# Bus range names as machine.py names them; the device's class name is the fallback key.
_BY_NAME: tuple[tuple[re.Pattern[str], Describer], ...] = (
    (re.compile(r"COM[1-4]$"), describe_uart),
    (re.compile(r"CMOS"), describe_cmos),
    (re.compile(r"i8042"), describe_i8042),
    (re.compile(r"(isa-)?debug-exit$"), describe_debug_exit),
    (re.compile(r"fw_cfg$"), describe_fw_cfg),
    (re.compile(r"ACPI PM1a$"), describe_pm1),
    (re.compile(r"ACPI PM timer$"), describe_pm_timer),
    (re.compile(r"ACPI reset register$"), describe_reset_register),
    (re.compile(r"vd[a-z]+$"), describe_virtio_mmio),
    (re.compile(r"PCI host"), describe_pci_host),
    (re.compile(r"edu "), describe_edu),
    (re.compile(r"intel-iommu$"), describe_intel_iommu),
)
_BY_TYPE: dict[str, Describer] = {
    "Serial16550A": describe_uart,
    "CmosRtc": describe_cmos,
    "DebugExit": describe_debug_exit,
    "FwCfg": describe_fw_cfg,
    "Pm1Registers": describe_pm1,
    "PmTimer": describe_pm_timer,
    "ResetRegister": describe_reset_register,
    "MmioTransport": describe_virtio_mmio,
    "PciHost": describe_pci_host,
    "EduDevice": describe_edu,
    "IntelIommu": describe_intel_iommu,
}


_CACHE: dict[tuple[str | None, type], Describer] = {}


def describer_for(name: str | None, device: object = None) -> Describer:
    """The family function for a bus range name, or for the device's type (cached: a trace asks
    at every exit)."""
    key = (name, type(device))
    describer = _CACHE.get(key)
    if describer is None:
        describer = _CACHE[key] = _find_describer(name, device)
    return describer


def _find_describer(name: str | None, device: object) -> Describer:
    if device is not None:
        by_type = _BY_TYPE.get(type(device).__name__)
        if by_type is not None:
            return by_type
    if name:
        for pattern, describer in _BY_NAME:
            if pattern.match(name):
                return describer
    return describe_generic


def device_meaning(event: ExitEvent, device: object = None) -> Meaning | None:
    """What the device made of a port or MMIO access; None for other exits."""
    if not isinstance(event, (PortIo, MmioAccess)):
        return None
    return describer_for(event.device, device)(event, device)
