"""Snapshot save and restore times, against a cold start of the same guest in the same run.

A test guest (tests/guests/user_mode.S, mode 3: greets, then writes a Python device port N times
and exits through the debug-exit port) is saved at its 1000th device write, then restored:

  save_ms          Machine.save() of the paused machine (RAM file written sparse, fsync, hashes)
  restore_ms       Machine.restore() call until the restored guest made its first exit (executing
                   again), RAM hash check off (`verify_memory=False`) as a trusted CI cache would
  restore_verified_ms  the same with the RAM file's sha256 checked
  restore_cli_ms   process start of `pyhv run --restore` to the outcome of the rest of the run
  cold_cli_ms      process start of `pyhv run --raw` of the same guest to its outcome (reference)

for guests of 256 MiB and 1 GiB of RAM (`restore_growth` = restore_ms at 1 GiB / at 256 MiB; the
issue's target is < 2: the RAM is mapped, not read). The Linux figures of the issue
(restore_to_command_ms against boot_to_command_ms, `pyhv exec -- true` from a restore and from a
cold boot, and their ratio `speedup`) need the bundled guest: --linux. Child processes may
write their bytecode cache, as an installed pyhv has one (_common.CHILD_ENVIRONMENT).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import CHILD_ENVIRONMENT, ROOT, emit, median

from hypervisor.console import NullConsole
from hypervisor.machine import Machine
from tests.guests.build import GUEST_BASE, MODE_OUT_COUNT, build_guest, with_parameters

PORT = 0x520
WRITES = 2000
SAVE_AT = 1000


class Counter:
    def __init__(self) -> None:
        self.writes = 0
        self.first_at: float | None = None

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1
        if self.first_at is None:
            self.first_at = time.perf_counter()


def guest_image() -> bytes:
    image = build_guest("user_mode").read_bytes()
    return with_parameters(image, exit_code=0, mode=MODE_OUT_COUNT, port=PORT, count=WRITES)


def save_once(memory_mib: int, folder: Path) -> float:
    machine = Machine(memory_mib, console=NullConsole())
    machine.add_port_device(Counter(), PORT, 1, "counter")
    machine.load_raw_bytes(guest_image(), GUEST_BASE)
    with machine:
        stop_at = machine.break_on("io", port=PORT, is_write=True, count=SAVE_AT)
        machine.start()
        assert machine.wait_for_stop(60) is not None
        machine.delete_breakpoint(stop_at.id)
        started = time.perf_counter()
        machine.save(str(folder))
        elapsed = time.perf_counter() - started
        machine.resume()
        machine.wait(60)
    return elapsed * 1000


def restore_once(folder: Path, verify: bool) -> float:
    started = time.perf_counter()
    machine = Machine.restore(str(folder), NullConsole(), verify_memory=verify)
    counter = Counter()
    machine.add_port_device(counter, PORT, 1, "counter")
    with machine:
        result = machine.run(60)
    assert result.exit_status == 0 and counter.writes == WRITES - SAVE_AT and counter.first_at is not None
    return (counter.first_at - started) * 1000


def cli_ms(arguments: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "hypervisor", "run", "--console", "none", *arguments],
                            capture_output=True, timeout=120, cwd=ROOT, env=CHILD_ENVIRONMENT)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return (time.perf_counter() - started) * 1000


def linux_figures(work: Path, rounds: int) -> dict[str, object]:
    """The bundled guest: `pyhv exec -- true` from a cold boot, against `pyhv exec --restore`
    of the same guest saved at its shell prompt (one boot saves it and ends there)."""
    started = time.perf_counter()
    cold = subprocess.run([sys.executable, "-m", "hypervisor", "exec", "--", "true"], capture_output=True,
                          timeout=1800, cwd=ROOT, env=CHILD_ENVIRONMENT)  # fmt: skip
    boot_to_command_ms = (time.perf_counter() - started) * 1000
    assert cold.returncode == 0, cold.stderr
    folder = work / "linux"
    saving = subprocess.run([sys.executable, "-m", "hypervisor", "run", "--console", "none", "--save", str(folder),
                             "--save-on", "pyhv:/# ", "--save-then", "stop"], capture_output=True, timeout=1800,
                            cwd=ROOT, env=CHILD_ENVIRONMENT)  # fmt: skip
    assert saving.returncode == 0 and (folder / "header.json").exists(), saving.stderr
    warm = []
    for _ in range(rounds):
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "hypervisor", "exec", "--restore", str(folder), "--", "true"],
                                capture_output=True, timeout=600, cwd=ROOT, env=CHILD_ENVIRONMENT)  # fmt: skip
        warm.append((time.perf_counter() - started) * 1000)
        assert result.returncode == 0, result.stderr
    restore_to_command_ms = median(warm)
    print(f"bundled guest, `true`: cold boot {boot_to_command_ms / 1000:.1f} s, restored {restore_to_command_ms:.0f} ms")  # noqa: E501
    return {
        "boot_to_command_ms": round(boot_to_command_ms),
        "restore_to_command_ms": round(restore_to_command_ms),
        "speedup": round(boot_to_command_ms / restore_to_command_ms, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--linux", action="store_true", help="also the bundled Linux guest (minutes on kvm_pvm)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pyhv-snapshot-bench-"))
    figures: dict[str, object] = {"rounds": args.rounds}
    try:
        for mib in (256, 1024):
            folder = work / f"saved-{mib}"
            saves = []
            for _ in range(args.rounds):
                shutil.rmtree(folder, ignore_errors=True)
                saves.append(save_once(mib, folder))
            restores = [restore_once(folder, verify=False) for _ in range(args.rounds)]
            verified = [restore_once(folder, verify=True) for _ in range(args.rounds)]
            figures[f"save_ms_{mib}"] = round(median(saves), 1)
            figures[f"restore_ms_{mib}"] = round(median(restores), 1)
            figures[f"restore_verified_ms_{mib}"] = round(median(verified), 1)
            print(f"{mib:5d} MiB: save {median(saves):7.1f} ms, restore {median(restores):6.1f} ms, "
                  f"restore with RAM hash {median(verified):7.1f} ms")  # fmt: skip
        raw = work / "guest.bin"
        image = guest_image()
        # The cold reference: the same guest with its device port unmapped runs to its exit.
        raw.write_bytes(image)
        folder = work / "saved-256"
        cold = [cli_ms(["--raw", f"{raw}@{GUEST_BASE:#x}", "--mem", "256M"]) for _ in range(args.rounds)]
        warm = [cli_ms(["--restore", str(folder)]) for _ in range(args.rounds)]
        figures["cold_cli_ms"] = round(median(cold), 1)
        figures["restore_cli_ms"] = round(median(warm), 1)
        figures["save_ms"] = figures["save_ms_256"]
        figures["restore_ms"] = figures["restore_ms_256"]
        figures["restore_growth"] = round(float(figures["restore_ms_1024"]) / float(figures["restore_ms_256"]), 2)  # type: ignore[arg-type]
        print(f"pyhv run --raw (cold): {median(cold):.1f} ms; pyhv run --restore: {median(warm):.1f} ms")
        print(f"restore at 1 GiB / 256 MiB: {figures['restore_growth']} (target < 2)")
        if args.linux:
            figures.update(linux_figures(work, min(args.rounds, 3)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(figures)


if __name__ == "__main__":
    main()
