"""Saving a whole machine to a snapshot folder and rebuilding a machine from one.

A snapshot is a folder (docs/snapshots.md):

* `header.json`: format name and version, pyhv's version, the host it was taken on (CPU vendor,
  kvm_pvm or not), the machine's configuration, and every other part with its size and sha256;
* `memory.raw`: guest RAM, the regions one after the other, sparse (zero chunks are holes);
* `state.json`: per vCPU the raw KVM state structs (hex), the MSRs, LAPIC, events and MP state;
  the in-kernel PIC/IOAPIC, PIT and KVM clock; every device's state (hypervisor.devices.state),
  the virtio-mmio transports of the disks with their queues among them.

Disks are not copied: each is frozen at the save and referred to by the header's `disks`
(hypervisor.snapshot.disks); a restore gives each a fresh overlay on its frozen image.

Saving pauses every vCPU with the acknowledged pause, so the state is one instant's, and resumes
them afterwards. Restoring maps memory.raw copy-on-write (MAP_PRIVATE): its cost does not grow with
the guest's RAM and the file is never modified. Everything is checked before a VM exists; any
mismatch is one ConfigError line (exit status 3).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypervisor import __version__
from hypervisor.errors import ConfigError
from hypervisor.memory.guest_memory import sparse_file_digest
from hypervisor.snapshot.disks import (
    attach_restored_disks,
    check_disks_can_freeze,
    check_frozen,
    freeze_disks,
    parse_records,
)
from hypervisor.snapshot.kvm_state import (
    VcpuState,
    VmState,
    capture_vcpu,
    capture_vm,
    missing_capabilities,
    restore_vcpu,
    restore_vm,
    saved_msr_indices,
)

if TYPE_CHECKING:
    from hypervisor.console.protocol import Console
    from hypervisor.machine import Machine

log = logging.getLogger(__name__)

FORMAT = "pyhv-snapshot"
FORMAT_VERSION = 1
HEADER = "header.json"
MEMORY = "memory.raw"
STATE = "state.json"
HEADER_LIMIT = 1 << 20  # a header is a few KiB; anything larger is not ours
STATE_LIMIT = 64 << 20
HASH_CHUNK = 1 << 20


def host_identity() -> dict[str, object]:
    """What a restore must match: KVM state structs are only valid on the same kind of CPU."""
    from hypervisor.kvm import kvm_is_pvm

    vendor = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    vendor = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu_vendor": vendor, "machine": platform.machine(), "kvm_pvm": kvm_is_pvm()}


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _devices(machine: Machine) -> dict[str, Any]:
    """The machine's stateful devices by a stable name."""
    devices: dict[str, Any] = {"serial": machine.serial, "i8042": machine.i8042, "rtc": machine.rtc}
    for name in ("fw_cfg", "pm1", "pm_timer"):
        device = getattr(machine, name, None)
        if device is not None and hasattr(device, "state"):
            devices[name] = device
    for disk in machine.disks:
        devices[disk.name] = disk.transport
    return devices


def save_machine(machine: Machine, path: str | os.PathLike[str]) -> Path:
    """Writes the snapshot folder `path` (which must not exist yet) and returns it."""
    target = Path(path)
    if target.exists():
        raise ConfigError(f"snapshot {target} already exists")
    if not target.parent.is_dir():
        raise ConfigError(f"snapshot {target}: the directory {target.parent} does not exist")
    assert machine.kvm is not None and machine.vm is not None and machine.memory is not None
    if machine.control.stop_requested:
        raise ConfigError("the machine has stopped; there is nothing left to save")
    if machine.asleep:
        # The wake-up (RTC alarm, FACS vector) is the machine's, not in the saved state.
        raise ConfigError("the guest is suspended to RAM (S3); save it while it is awake")
    if machine.config.get("pci_devices"):
        # Their state (configuration space, remapping registers) has no snapshot form yet.
        raise ConfigError("a machine with PCI devices (--device) cannot be saved yet")
    check_disks_can_freeze(machine, target.resolve())
    started = time.monotonic()
    was_paused = machine.paused
    # Built in a temporary folder beside the target and renamed into place at the end, so a
    # crash or an error never leaves something that looks like a snapshot.
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if not machine.pause(wait=True, timeout=10):
            raise ConfigError("the vCPUs did not stop within 10 s; nothing was saved")
        # Drain: with the vCPUs parked nothing new arrives; each disk's I/O thread finishes the
        # requests it took and stops, so no request is half done in the saved state.
        draining = [disk.transport for disk in machine.disks if disk.transport.io_running]
        try:
            for transport in draining:
                if not transport.stop():
                    raise ConfigError(f"{transport.name}: a disk request did not finish; nothing was saved")
            msr_indices = saved_msr_indices(machine.kvm)
            vcpus = [capture_vcpu(vcpu, msr_indices) for vcpu in machine.vcpus]
            vm_state = capture_vm(machine.vm)
            devices = {name: device.state() for name, device in _devices(machine).items()}
            frozen = freeze_disks(machine, target.resolve())
            descriptor = os.open(building / MEMORY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            memory_digest = hashlib.sha256()
            try:
                data_bytes = machine.memory.save_sparse(descriptor, memory_digest)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        finally:
            for transport in draining:
                transport.start()
            if not was_paused:
                machine.resume()
        state = {
            "vcpus": [_vcpu_to_json(vcpu) for vcpu in vcpus],
            "vm": {"irqchips": [blob.hex() for blob in vm_state.irqchips], "pit": vm_state.pit.hex(),
                   "clock": vm_state.clock.hex()},
            "devices": devices,
        }  # fmt: skip
        (building / STATE).write_text(json.dumps(state))
        parts = {
            MEMORY: {"size": (building / MEMORY).stat().st_size, "sparse_sha256": memory_digest.hexdigest()},
            STATE: {"size": (building / STATE).stat().st_size, "sha256": _sha256_of_file(building / STATE)},
        }
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "pyhv_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": host_identity(),
            "machine": {**machine.config, "linux_console_rules": machine.observer.linux_rules},
            "memory_data_bytes": data_bytes,
            "parts": parts,
            "disks": [disk.to_json() for disk in frozen],
        }
        (building / HEADER).write_text(json.dumps(header, indent=2) + "\n")
        os.rename(building, target)
    except BaseException:
        for child in building.iterdir() if building.exists() else ():
            child.unlink()
        if building.exists():
            building.rmdir()
        raise
    log.info("saved the machine to %s in %.0f ms (%d MiB of RAM data)", target,
             (time.monotonic() - started) * 1000, data_bytes >> 20)  # fmt: skip
    return target


def _vcpu_to_json(state: VcpuState) -> dict[str, object]:
    return {
        "blobs": {name: blob.hex() for name, blob in state.blobs.items()},
        "msrs": {f"{index:#x}": value for index, value in state.msrs.items()},
        "lapic": state.lapic.hex(),
        "events": state.events.hex(),
        "mp_state": state.mp_state,
    }


def _vcpu_from_json(data: dict[str, Any]) -> VcpuState:
    return VcpuState(
        blobs={name: bytes.fromhex(blob) for name, blob in data["blobs"].items()},
        msrs={int(index, 16): int(value) for index, value in data["msrs"].items()},
        lapic=bytes.fromhex(data["lapic"]),
        events=bytes.fromhex(data["events"]),
        mp_state=int(data["mp_state"]),
    )


def read_header(folder: Path) -> dict[str, Any]:
    """The checked header of the snapshot in `folder`, or one ConfigError line."""
    header_path = folder / HEADER
    try:
        if not folder.is_dir():
            raise ConfigError(f"snapshot {folder} is not a folder made by `pyhv run --save`")
        if header_path.stat().st_size > HEADER_LIMIT:
            raise ConfigError(f"snapshot {folder}: {HEADER} is too large to be a pyhv header")
        header = json.loads(header_path.read_text())
    except FileNotFoundError as error:
        raise ConfigError(f"snapshot {folder} has no {HEADER}") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"snapshot {folder}: {HEADER} cannot be read: {error}") from error
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ConfigError(f"snapshot {folder}: {HEADER} is not a pyhv snapshot header")
    if header.get("version") != FORMAT_VERSION:
        raise ConfigError(
            f"snapshot {folder} has format version {header.get('version')}; this pyhv reads version {FORMAT_VERSION}"
        )
    host = host_identity()
    saved_host = header.get("host", {})
    for key in ("cpu_vendor", "machine"):
        if saved_host.get(key) != host[key]:
            raise ConfigError(
                f"snapshot {folder} was taken on a {key.replace('_', ' ')} {saved_host.get(key)!r}, "
                f"this host is {host[key]!r}: KVM state does not move between them"
            )
    parts = header.get("parts")
    if not isinstance(parts, dict) or set(parts) != {MEMORY, STATE}:
        raise ConfigError(f"snapshot {folder}: the header does not name its parts")
    return header


def _check_part(folder: Path, header: dict[str, Any], name: str, verify_hash: bool) -> Path:
    path = folder / name
    expected = header["parts"][name]
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ConfigError(f"snapshot {folder}: {name} is missing ({error.strerror})") from error
    if size != expected.get("size"):
        raise ConfigError(f"snapshot {folder}: {name} is {size} bytes, the header says {expected.get('size')}")
    if verify_hash:
        if "sparse_sha256" in expected:
            digest = hashlib.sha256()
            with open(path, "rb") as stream:
                sparse_file_digest(stream.fileno(), size, digest)
            actual, wanted = digest.hexdigest(), expected["sparse_sha256"]
        else:
            actual, wanted = _sha256_of_file(path), expected.get("sha256")
        if actual != wanted:
            raise ConfigError(f"snapshot {folder}: {name} does not match its sha256 in the header (damaged)")
    return path


def restore_machine(
    machine_class: type[Machine],
    path: str | os.PathLike[str],
    console: Console | None,
    verify_memory: bool = True,
    disk_overlay: str | None = None,
) -> Machine:
    """A `machine_class` (hypervisor.machine.Machine, which calls this from Machine.restore)
    rebuilt from the folder `path`. The class is passed in so that this module, which the
    machine imports to save itself, does not import the machine back (tests/test_import_cycles.py).
    `disk_overlay`: the folder for each disk's fresh overlay (None: a temporary folder that is
    removed when the machine closes)."""
    folder = Path(path)
    header = read_header(folder)
    disks = parse_records(header.get("disks", []), folder)
    check_frozen(disks, folder)
    state_path = _check_part(folder, header, STATE, verify_hash=True)
    memory_path = _check_part(folder, header, MEMORY, verify_hash=verify_memory)
    if state_path.stat().st_size > STATE_LIMIT:
        raise ConfigError(f"snapshot {folder}: {STATE} is too large")
    try:
        state = json.loads(state_path.read_text())
        config = header["machine"]
        vcpus = [_vcpu_from_json(vcpu) for vcpu in state["vcpus"]]
        vm_state = VmState(
            irqchips=[bytes.fromhex(blob) for blob in state["vm"]["irqchips"]],
            pit=bytes.fromhex(state["vm"]["pit"]),
            clock=bytes.fromhex(state["vm"]["clock"]),
        )
        regions = [(int(gpa), int(size)) for gpa, size in config["memory_regions"]]
        devices = state["devices"]
        cpus = int(config["cpus"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ConfigError(f"snapshot {folder}: {STATE} or the header is damaged ({error!r})") from error
    if len(vcpus) != cpus or sum(size for _, size in regions) != header["parts"][MEMORY]["size"]:
        raise ConfigError(f"snapshot {folder}: the header's machine does not match its state")
    if not isinstance(devices, dict) or any(disk.name not in devices for disk in disks):
        raise ConfigError(f"snapshot {folder}: the header's disks have no saved device state")
    descriptor = os.open(memory_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        machine = machine_class(
            int(config["memory_mib"]), cpus=cpus, console=console, debug_exit_port=int(config["debug_exit_port"]),
            debug_exit_qemu=bool(config["debug_exit_qemu"]), memory_regions=regions,
            pvm_emulation=bool(config["pvm_emulation"]), machine_type=str(config.get("machine_type", "pc")),
            memory_file=descriptor,
        )  # fmt: skip
    finally:
        os.close(descriptor)  # the mappings keep the file
    overlays: list[Path] = []
    try:
        assert machine.vm is not None and machine.kvm is not None
        missing = missing_capabilities(machine.kvm, vcpus)
        if missing:
            raise ConfigError(f"snapshot {folder} needs what this host's KVM lacks: {', '.join(missing)}")
        overlays = attach_restored_disks(machine, disks, disk_overlay)
        restore_vm(machine.vm, vm_state)
        for vcpu, vcpu_state in zip(machine.vcpus, vcpus, strict=True):
            restore_vcpu(vcpu, vcpu_state)
        machine.observer.linux_rules = bool(config.get("linux_console_rules", False))
        known = _devices(machine)
        for name, device_state in devices.items():
            if name not in known:
                raise ConfigError(f"snapshot {folder}: this machine has no device {name!r} to restore")
            known[name].restore_state(device_state)
    except BaseException:
        machine.close()
        for overlay in overlays:  # nothing of a failed restore stays behind
            overlay.unlink(missing_ok=True)
        raise
    return machine
