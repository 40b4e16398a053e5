"""Where a boot of the bundled guest goes: seconds per kernel phase, from `pyhv run` to the shell.

Boots the guest (no command: init starts its shell) with its console on a pipe, timestamps every
console line on the host as it arrives, and splits the time between marker lines the kernel
prints at the start of each phase (the table below); `exit` is typed at the shell prompt so the
run ends by itself. `--reference KERNEL` boots a second kernel (for example main's vmlinux
before a change, `git show main:guest_images/vmlinux.xz > old.xz`) with the same initramfs in
the same run, alternating with the first, and reports the ratio of the totals. `--plot PNG`
draws one stacked bar per kernel (docs/performance.md's boot-phase picture; needs matplotlib,
pyhv's `plot` extra). Last line: one JSON object.
Usage: python benchmarks/boot_phases.py [--kernel K] [--reference K] [--rounds N] [--plot PNG]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import CHILD_ENVIRONMENT, ROOT, emit

# (phase name, the console line that starts it); a phase ends where the next one starts.
MARKERS: tuple[tuple[str, bytes], ...] = (
    ("host: load and enter", b""),  # from the start of `pyhv run`
    ("early setup: memory map, struct pages", b"Linux version "),
    ("page allocator, scheduler, alternatives", b"Memory: "),
    ("initcalls: ACPI, devices, drivers", b"devtmpfs: initialized"),
    ("initramfs unpack (and late initcalls)", b"Unpacking initramfs"),
    ("freeing init memory, read-only data", b"Freeing initrd memory"),
    ("init: exec, mount", b"Run /init as init process"),
    ("shell start (setsid, cttyhack, sh)", b"pyhv guest: init started"),
)
SHELL_PROMPT = b"pyhv:/# "  # guest_images/init's PS1 in /
DEFAULT_INITRD = ROOT / "guest_images" / "initramfs.cpio.xz"


def boot(kernel: Path | None, initrd: Path, timeout: float) -> dict[str, float]:
    """Host seconds at which each marker (and the prompt, as "prompt") first showed."""
    command = [sys.executable, "-m", "hypervisor", "run", "--console", "stdio", "--timeout", str(timeout)]
    if kernel is not None:
        command += ["--kernel", str(kernel), "--initrd", str(initrd)]
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, env=CHILD_ENVIRONMENT)  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    seen: dict[str, float] = {}
    pending = b""
    try:
        while "prompt" not in seen:
            chunk = os.read(process.stdout.fileno(), 65536)  # the run's --timeout bounds this
            if not chunk:
                break
            now = time.monotonic() - start
            pending += chunk
            for name, marker in MARKERS:
                if marker and name not in seen and marker in pending:
                    seen[name] = now
            if SHELL_PROMPT in pending:
                seen["prompt"] = now
                process.stdin.write(b"exit\n")
                process.stdin.flush()
            pending = pending[pending.rfind(b"\n") + 1 :]  # markers never span lines
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return seen


def phase_seconds(seen: dict[str, float]) -> dict[str, float] | None:
    """Each phase's duration, or None if a marker or the prompt never showed."""
    names = [name for name, _ in MARKERS]
    starts = [0.0] + [seen.get(name, -1.0) for name in names[1:]] + [seen.get("prompt", -1.0)]
    if min(starts) < 0 or starts != sorted(starts):
        return None
    return {name: starts[i + 1] - starts[i] for i, name in enumerate(names)}


def median_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(run[name] for run in runs) for name, _ in MARKERS}


def plot(path: Path, bars: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 1.2 + 0.9 * len(bars)))
    labels = list(bars)
    colours = plt.get_cmap("tab10")
    for index, (name, _) in enumerate(MARKERS):
        widths = [bars[label][name] for label in labels]
        lefts = [sum(bars[label][n] for n, _ in MARKERS[:index]) for label in labels]
        axes.barh(labels, widths, left=lefts, color=colours(index), label=name)
        for y, (left, width) in enumerate(zip(lefts, widths, strict=True)):
            if width >= 1.5:
                axes.text(left + width / 2, y, f"{width:.1f}", ha="center", va="center", fontsize=8)
    axes.set_xlabel("seconds from `pyhv run` to the shell prompt (kvm_pvm host, medians)")
    axes.invert_yaxis()
    axes.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.35 - 0.1 * len(bars)))
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", type=Path, help="default: the bundled vmlinux")
    parser.add_argument("--initrd", type=Path, default=DEFAULT_INITRD)
    parser.add_argument("--reference", type=Path, help="a second kernel, booted alternately")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    kernels = {"bundled" if args.kernel is None else args.kernel.name: args.kernel}
    if args.reference is not None:
        kernels["reference " + args.reference.name] = args.reference
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in kernels}
    for _ in range(args.rounds):
        for label, kernel in kernels.items():
            phases = phase_seconds(boot(kernel, args.initrd, args.timeout))
            if phases is None:
                raise SystemExit(f"boot_phases: {label}: a phase marker or the shell prompt did not show")
            runs[label].append(phases)
    medians = {label: median_phases(label_runs) for label, label_runs in runs.items()}
    print(f"{'phase':44}" + "".join(f"{label[:18]:>20}" for label in medians))
    for name, _ in MARKERS:
        print(f"{name:44}" + "".join(f"{medians[label][name]:19.2f}s" for label in medians))
    totals = {label: sum(phases.values()) for label, phases in medians.items()}
    print(f"{'to the shell prompt':44}" + "".join(f"{totals[label]:19.2f}s" for label in medians))
    figures: dict[str, object] = {"rounds": args.rounds}
    for number, label in enumerate(medians):
        key = "boot" if number == 0 else "reference"
        figures[f"{key}_to_shell_s"] = round(totals[label], 2)
        figures[f"{key}_phases_s"] = {name: round(value, 2) for name, value in medians[label].items()}
    if args.reference is not None:
        first, second = totals.values()
        figures["ratio_to_reference"] = round(first / second, 3)
    if args.plot is not None:
        plot(args.plot, medians)
        print(f"picture: {args.plot}")
    emit(figures)


if __name__ == "__main__":
    main()
