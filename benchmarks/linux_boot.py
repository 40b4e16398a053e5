"""Linux boot phases of the bundled guest: pyhv beside QEMU on the same kernel, in one run.

pyhv boots guest_images/vmlinux.xz + initramfs.cpio.xz with `pyhv.cmd="true"` (the init runs
the command and resets) and reports the time to its first console byte, the kernel banner,
`Run /init`, the init's greeting and the reset (`--report`); then boots it again with no command
and times its shell prompt (`boot_to_shell_s`: the console `pyhv run` prints on stdout, `exit`
typed once the prompt shows). The reference is the same kernel
and initramfs under `qemu-system-x86_64 -accel tcg` (guest_images/qemu_check.py), and under
`-enable-kvm` where that works (on kvm_pvm hosts it hangs before the banner: shared/PLATFORM.md,
so it gets a short timeout and is reported as not booting). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import CHILD_ENVIRONMENT, ROOT, emit
from boot_phases import DEFAULT_INITRD, SHELL_PROMPT
from boot_phases import boot as boot_to_prompt

sys.path.insert(0, str(ROOT / "guest_images"))
from qemu_check import BASE_APPEND, plain_initramfs, plain_vmlinux, run_qemu  # noqa: E402

COMMAND = 'pyhv.cmd="true"'
PHASES = ("first_byte", "banner", "run_init", "init_greeting", "reboot", "shell_prompt")
# pyhv's report names for the same phases
PYHV_NAMES = {
    "first_byte": "first_console_byte", "banner": "kernel_banner", "run_init": "init_started",
    "init_greeting": "guest_init_greeting", "reboot": "reboot",
}  # fmt: skip


def pyhv_boot(timeout: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "hypervisor", "run", "--console", "none", "--timeout", str(timeout),
                   "--append", COMMAND, "--report", str(report)]  # fmt: skip
        subprocess.run(command, cwd=ROOT, capture_output=True, timeout=timeout + 60, env=CHILD_ENVIRONMENT)
        timeline = json.loads(report.read_text())["timeline"]
    return {phase: timeline[name] for phase, name in PYHV_NAMES.items() if name in timeline}


def qemu_boot(accelerator: str, timeout: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        kernel, initrd = plain_vmlinux(Path(tmp)), plain_initramfs(Path(tmp))
        argv = ["qemu-system-x86_64", "-accel", accelerator, "-m", "256", "-display", "none",
                "-monitor", "none", "-serial", "stdio", "-no-reboot", "-kernel", str(kernel),
                "-initrd", str(initrd), "-append"]  # fmt: skip
        phases = run_qemu(accelerator, [*argv, f"{BASE_APPEND} {COMMAND}"], [], None, b"", timeout).phases
        if phases:  # the same kernel again to its shell prompt, where `exit` is typed
            shell = run_qemu(accelerator, [*argv, BASE_APPEND], [], SHELL_PROMPT, b"exit\n", timeout).phases
            if "input_sent" in shell:
                phases["shell_prompt"] = shell["input_sent"]
        return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--kvm-timeout", type=float, default=30, help="how long QEMU -enable-kvm may take")
    args = parser.parse_args()
    pyhv = pyhv_boot(args.timeout)
    # No command: init starts its shell; `exit` is typed at the prompt (boot_phases.py).
    prompt = boot_to_prompt(None, DEFAULT_INITRD, args.timeout).get("prompt")
    if prompt is not None:
        pyhv["shell_prompt"] = prompt
    tcg = qemu_boot("tcg", args.timeout)
    kvm = qemu_boot("kvm", args.kvm_timeout)
    print(f"{'phase':15} {'pyhv':>9} {'QEMU tcg':>9} {'QEMU kvm':>9}  pyhv/tcg")
    figures: dict[str, object] = {}
    for phase in PHASES:
        ours, theirs, hardware = pyhv.get(phase), tcg.get(phase), kvm.get(phase)
        ratio = ours / theirs if ours is not None and theirs else None

        def show(value: float | None) -> str:
            return f"{value:8.2f}s" if value is not None else "        -"

        print(f"{phase:15} {show(ours)} {show(theirs)} {show(hardware)}  {ratio:.1f}" if ratio else
              f"{phase:15} {show(ours)} {show(theirs)} {show(hardware)}")  # fmt: skip
        figures[f"pyhv_{phase}_s"] = ours
        figures[f"qemu_tcg_{phase}_s"] = theirs
        figures[f"qemu_kvm_{phase}_s"] = hardware
        if ratio:
            figures[f"{phase}_ratio_to_tcg"] = round(ratio, 2)
    # The issue-12 target: the bundled guest to its shell prompt in <= 25 s on a kvm_pvm host.
    figures["boot_to_shell_s"] = round(prompt, 2) if prompt is not None else None
    if prompt is not None and tcg.get("shell_prompt"):
        figures["boot_to_shell_ratio_to_tcg"] = round(prompt / tcg["shell_prompt"], 1)
    if not kvm:
        print(f"QEMU -enable-kvm printed nothing within {args.kvm_timeout:g} s on this host")
    emit(figures)


if __name__ == "__main__":
    main()
