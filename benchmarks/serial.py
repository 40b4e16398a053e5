"""Guest-to-host console throughput, with COM1's transmit side in C and with every access in Python.

The guest (tests/guests/user_mode.S, mode 3) prints its greeting by polling LSR and writing THR,
then writes THR `--bytes` times in a loop (at CPL3, so on kvm_pvm hosts the loop runs natively);
the console collects what arrives. Each round runs a fresh machine once with the C path
(Machine(serial_fast_path=True), the default) and once without it (False), alternating; the rate
is bytes over the time from the first to the last byte the console received. Every byte must
arrive, in order, on both paths.

`--boot` also boots the bundled Linux guest (`pyhv.cmd="true"`, about a minute here) on each
path and reports its exits that reached Python (`boot_exits_before`: all console accesses in
Python; `boot_exits_after`: with the C path) and the exits by reason, which do not change: a
port access exits KVM either way, the C path only answers it without Python.

Targets (issue 12): ratio (C / Python) reported, same bytes. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import time

from _common import emit, median

from hypervisor.console import ConsoleBase
from hypervisor.machine import Machine
from tests.guests.build import GUEST_BASE, MODE_OUT_COUNT, guest_image


class CountingConsole(ConsoleBase):
    """Collects what arrives, with the times of the first and last byte."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected = expected
        self.received = bytearray()
        self.first = self.last = 0.0

    def _emit(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.received:
            self.first = now
        self.received += data
        self.last = now


def serial_round(count: int, fast: bool) -> tuple[float, dict[str, object]]:
    greeting = b"hello from user mode\n"
    console = CountingConsole(len(greeting) + count)
    with Machine(16, console=console, serial_fast_path=fast) as machine:
        machine.load_raw_bytes(guest_image("user_mode", mode=MODE_OUT_COUNT, port=0x3F8, count=count), GUEST_BASE)
        result = machine.run(timeout=300)
    # The loop writes AL, which holds the guest's mode number then (common.S GUEST_BODY).
    if result.exit_status != 0 or bytes(console.received) != greeting + bytes([MODE_OUT_COUNT]) * count:
        raise SystemExit(f"serial round (fast={fast}): {result.outcome} with {len(console.received)} bytes "
                         f"of {console.expected}, or not the bytes written")  # fmt: skip
    return count / (console.last - console.first), result.statistics


def boot_exits(fast: bool) -> dict[str, object]:
    """One bundled-guest boot to its command's end, in process (RunOptions.serial_fast_path)."""
    from hypervisor.console import NullConsole
    from hypervisor.launch import RunOptions, create_machine

    options = RunOptions(append='pyhv.cmd="true"', timeout=600, serial_fast_path=fast)
    machine, _info = create_machine(options, NullConsole())
    with machine:
        result = machine.run(options.timeout)
    stats = result.statistics
    return {"python_exits": stats["python_exits"], "total_exits": stats["total_exits"],
            "by_reason": stats["exits_by_reason"], "wall_s": round(result.wall_seconds, 1),
            "outcome": result.outcome.kind.value}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--boot", action="store_true", help="also count the exits of a bundled-guest boot")
    args = parser.parse_args()

    serial_round(2000, True)  # warms up (imports, guest build)
    c_rates, py_rates = [], []
    for _ in range(args.rounds):
        rate, _stats = serial_round(args.bytes, True)
        c_rates.append(rate)
        rate, _stats = serial_round(args.bytes, False)
        py_rates.append(rate)
    c_rate, py_rate = median(c_rates), median(py_rates)
    print(f"{args.bytes} bytes per round, {args.rounds} rounds (medians)")
    print(f"C transmit path : {c_rate / 1e6:8.3f} MB/s")
    print(f"Python UART     : {py_rate / 1e6:8.3f} MB/s")
    print(f"ratio C/Python  : {c_rate / py_rate:8.1f}")
    figures: dict[str, object] = {
        "serial_bytes_per_s_c": round(c_rate), "serial_bytes_per_s_py": round(py_rate),
        "ratio": round(c_rate / py_rate, 2), "bytes_per_round": args.bytes, "rounds": args.rounds,
    }  # fmt: skip
    if args.boot:
        before, after = boot_exits(False), boot_exits(True)
        print(
            f"bundled boot, exits that reached Python: {before['python_exits']} without the C path, "
            f"{after['python_exits']} with it (KVM exits {before['total_exits']} and {after['total_exits']})"
        )
        figures.update(boot_exits_before=before, boot_exits_after=after)
    emit(figures)


if __name__ == "__main__":
    main()
