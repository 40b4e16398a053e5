"""Time per VM exit: raw KVM_RUN loop vs pyhv's C fast path vs a Python device.

All three run the same guest loop (tests/guests/user_mode.S, mode 2: `out %al, %dx` forever at
CPL3, so on kvm_pvm hosts the guest side runs natively) in the same VM, interleaved in rounds:
  (a) ref: csrc's pyhv_bench_raw_loop, KVM_RUN in a loop with no dispatch at all;
  (b) c:   pyhv_vcpu_run with the port in a sink range, completed in C (exit budget ends it);
  (c) py:  the real VcpuRunner dispatching each exit to a Python device (timed inside the device).
Targets (issue 2): c/ref <= 1.05 and py/ref <= 1.5. Usage: python benchmarks/exit_overhead.py
[--exits N] [--rounds R]. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import time

from _common import CountingDevice, emit, median

from hypervisor.console import NullConsole
from hypervisor.kvm.ffi import lib
from hypervisor.machine import Machine
from hypervisor.vcpu.runner import VcpuRunner
from tests.guests.build import GUEST_BASE, MODE_OUT_FOREVER, guest_image

SINK_PORT = 0x80  # the POST-code port, a C sink range in every Machine
PYTHON_PORT = 0x520  # a free port (fw_cfg is at 0x510)


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
    runner = VcpuRunner(vcpu, machine.pio_bus, machine.mmio_bus, machine.control)

    def python_round(exits: int) -> float:
        vcpu.set_regs(rdx=PYTHON_PORT)
        machine.control.reset()
        device.arm(exits)
        runner.run()
        return (device.last - device.first) / (exits - 1)

    def c_round(exits: int) -> float:
        vcpu.set_regs(rdx=SINK_PORT)
        vcpu.exit_budget = exits
        start = time.perf_counter()
        kind = lib.pyhv_vcpu_run(vcpu.state, vcpu.exit_record)
        elapsed = time.perf_counter() - start
        assert kind == lib.PYHV_EXIT_BUDGET, kind
        return elapsed / exits

    def reference_round(exits: int) -> float:
        vcpu.set_regs(rdx=SINK_PORT)
        start = time.perf_counter()
        result = lib.pyhv_bench_raw_loop(vcpu.state, exits)
        elapsed = time.perf_counter() - start
        assert result == 0, result
        return elapsed / exits

    python_round(2000)  # boots the guest into its loop (greeting included) and warms up
    reference, fast, python = [], [], []
    for _ in range(args.rounds):
        reference.append(reference_round(args.exits))
        fast.append(c_round(args.exits))
        python.append(python_round(args.exits))
    machine.close()

    ref_us, c_us, py_us = (median(v) * 1e6 for v in (reference, fast, python))
    print(f"exits per round: {args.exits}, rounds: {args.rounds} (medians)")
    print(f"(a) reference KVM_RUN loop : {ref_us:7.2f} us/exit")
    print(f"(b) C fast path (sink)     : {c_us:7.2f} us/exit  ratio {c_us / ref_us:.3f} (target <= 1.05)")
    print(f"(c) Python device          : {py_us:7.2f} us/exit  ratio {py_us / ref_us:.3f} (target <= 1.5)")
    emit({
        "ref_us_per_exit": round(ref_us, 3),
        "c_us_per_exit": round(c_us, 3),
        "py_us_per_exit": round(py_us, 3),
        "c_ratio": round(c_us / ref_us, 3),
        "py_ratio": round(py_us / ref_us, 3),
        "exits_per_round": args.exits,
        "rounds": args.rounds,
    })  # fmt: skip


if __name__ == "__main__":
    main()
