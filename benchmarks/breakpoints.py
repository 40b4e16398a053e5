"""Cost per VM exit of exit breakpoints that never match: N = 0, 1, 10, 100 installed.

The guest is benchmarks/exit_overhead.py's: tests/guests/user_mode.S mode 2, `out %al, %dx` to
port 0x520 forever at CPL3 (native speed on kvm_pvm hosts), each exit served by a Python device
through the real VcpuRunner. Every round runs each configuration once, interleaved, on the same
vCPU, so host noise spreads over all of them:
  none:   no breakpoint (the Python-device exit of exit_overhead.py (c));
  N:      N breakpoints on other ports and MMIO windows (addressed: the table's index skips them
          with a dictionary lookup and a bisect, no event is built);
  N-any:  N breakpoints without an address (`hlt`), which every exit must be checked against
          (for comparison: an event is built and each is tested).
Target (issue 8): 10 addressed breakpoints cost under 1.1x the exit with none.
Usage: python benchmarks/breakpoints.py [--exits N] [--rounds R]. Last line: one JSON object.
"""

from __future__ import annotations

import argparse

from _common import CountingDevice, emit, median

from hypervisor.console import NullConsole
from hypervisor.machine import Machine
from hypervisor.vcpu.breakpoints import Breakpoint
from hypervisor.vcpu.runner import VcpuRunner
from tests.guests.build import GUEST_BASE, MODE_OUT_FOREVER, guest_image

PYTHON_PORT = 0x520  # exit_overhead.py's port (fw_cfg is at 0x510)
COUNTS = (1, 10, 100)
UNADDRESSED_COUNT = 10
MMIO_BASE = 0xD000_0000


def never_matching(count: int) -> list[Breakpoint]:
    """Half on ports other than the guest's, half on MMIO windows: none sees port 0x520."""
    found = []
    for index in range(count):
        if index % 2 == 0:
            port = 0x3F8 + index // 2 if 0x3F8 + index // 2 != PYTHON_PORT else 0x2F8
            found.append(Breakpoint("io", port, is_write=True))
        else:
            low = MMIO_BASE + (index // 2) * 0x1000
            found.append(Breakpoint("mmio", (low, low + 0xFFF)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exits", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    machine = Machine(16, console=NullConsole())
    device = CountingDevice(machine)
    machine.add_port_device(device, PYTHON_PORT, 1, "benchmark device")
    machine.load_raw_bytes(guest_image("user_mode", mode=MODE_OUT_FOREVER, port=PYTHON_PORT), GUEST_BASE)
    machine.install_range_tables()
    vcpu = machine.vcpus[0]
    table = machine.breakpoints
    runner = VcpuRunner(vcpu, machine.pio_bus, machine.mmio_bus, machine.control, breakpoints=table)
    configurations: dict[str, list[Breakpoint]] = {"none": []}
    for count in COUNTS:
        configurations[str(count)] = never_matching(count)
    configurations[f"{UNADDRESSED_COUNT}-any"] = [Breakpoint("hlt") for _ in range(UNADDRESSED_COUNT)]

    def python_round(exits: int, breakpoints: list[Breakpoint]) -> float:
        table.clear()
        for breakpoint in breakpoints:
            table.add(breakpoint)
        machine.control.reset()
        device.arm(exits)
        runner.run()
        return (device.last - device.first) / (exits - 1)

    python_round(2000, [])  # boots the guest into its loop (greeting included) and warms up
    samples: dict[str, list[float]] = {name: [] for name in configurations}
    for _ in range(args.rounds):
        for name, breakpoints in configurations.items():
            samples[name].append(python_round(args.exits, breakpoints))
    assert all(breakpoint.hits == 0 for breakpoints in configurations.values() for breakpoint in breakpoints)
    machine.close()

    figures = {name: median(values) * 1e6 for name, values in samples.items()}
    baseline = figures["none"]
    print(f"exits per round: {args.exits}, rounds: {args.rounds} (medians; the host is shared, ratios only)")
    print(f"no breakpoint (Python device)      : {baseline:7.2f} us/exit")
    for name, value in figures.items():
        if name == "none":
            continue
        label = f"{name.split('-')[0]} unaddressed (hlt)" if name.endswith("-any") else f"{name} never matching"
        target = " (target < 1.1)" if name == "10" else ""
        print(f"{label:<35}: {value:7.2f} us/exit  ratio {value / baseline:.3f}{target}")
    result: dict[str, object] = {"none_us_per_exit": round(baseline, 3)}
    for name, value in figures.items():
        if name != "none":
            key = name.replace("-", "_")
            result[f"bp{key}_us_per_exit"] = round(value, 3)
            result[f"bp{key}_ratio"] = round(value / baseline, 3)
    result.update(exits_per_round=args.exits, rounds=args.rounds, target_met=figures["10"] / baseline < 1.1)
    emit(result)


if __name__ == "__main__":
    main()
