"""Process start to outcome, and peak memory, for a guest that exits at once.

Runs `python -m hypervisor run --raw real_mode.bin@0x1000 --console none` (the guest prints a
line and writes 0 to the debug-exit port) several times, beside the bare interpreter start
(`python -c pass`) as the reference measured in the same run. Targets (issue 2): startup <= 150
ms; peak RSS beyond guest RAM <= 40 MiB (the guest touches a few KiB of its 16 MiB, and guest
pages are only counted in RSS once touched, so the whole peak RSS is overhead).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from _common import CHILD_ENVIRONMENT, ROOT, emit, median

from tests.guests.build import build_guest

STARTUP_TARGET_MS = 150
RSS_TARGET_MIB = 40


def timed_child(command: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in KiB) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, env=CHILD_ENVIRONMENT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}): {process.stderr.read().decode()}")
    return elapsed, usage.ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    guest = build_guest("real_mode")
    pyhv = [sys.executable, "-m", "hypervisor", "run", "--raw", f"{guest}@0x1000", "--console", "none", "--mem", "16"]
    bare = [sys.executable, "-c", "pass"]
    timed_child(pyhv)  # warm the page cache and write the bytecode caches
    pyhv_runs = [timed_child(pyhv) for _ in range(args.runs)]
    bare_runs = [timed_child(bare) for _ in range(args.runs)]
    startup_ms = median([t for t, _ in pyhv_runs]) * 1000
    bare_ms = median([t for t, _ in bare_runs]) * 1000
    rss_mib = max(r for _, r in pyhv_runs) / 1024
    bare_rss_mib = max(r for _, r in bare_runs) / 1024
    print(f"pyhv run (guest exits at once): {startup_ms:6.1f} ms  (target <= {STARTUP_TARGET_MS} ms, "
          f"ratio to target {startup_ms / STARTUP_TARGET_MS:.2f})")
    print(f"bare python3 -c pass          : {bare_ms:6.1f} ms  (pyhv / bare = {startup_ms / bare_ms:.2f})")
    print(f"peak RSS pyhv                 : {rss_mib:6.1f} MiB (target <= {RSS_TARGET_MIB} MiB beyond guest RAM; "
          f"bare interpreter {bare_rss_mib:.1f} MiB)")
    emit({
        "startup_ms": round(startup_ms, 1),
        "bare_python_ms": round(bare_ms, 1),
        "startup_ratio_to_bare": round(startup_ms / bare_ms, 2),
        "startup_ratio_to_target": round(startup_ms / STARTUP_TARGET_MS, 3),
        "rss_overhead_mib": round(rss_mib, 1),
        "bare_python_rss_mib": round(bare_rss_mib, 1),
        "runs": args.runs,
    })  # fmt: skip


if __name__ == "__main__":
    main()
