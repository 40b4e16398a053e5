#!/usr/bin/env python3
"""Boot the bundled guest under QEMU TCG, check it and time its boot phases.

This is the reference the pyhv boot is compared against (docs/performance.md):
the same kernel and initramfs under ``qemu-system-x86_64 -accel tcg``.
``-enable-kvm`` hangs on kvm_pvm hosts (PLATFORM.md), so TCG is the only QEMU
reference there.

    guest_images/qemu_check.py cmd      # pyhv.cmd runs, prints its status, reboots
    guest_images/qemu_check.py shell    # `echo hi; exit` typed at the shell
    guest_images/qemu_check.py root     # -M microvm + virtio-mmio ext4 disk, root=/dev/vda
    guest_images/qemu_check.py all --json timings.json
    guest_images/qemu_check.py all --vmlinux   # the ELF vmlinux via its PVH note

Each check prints one line per boot phase with the seconds since QEMU started
and exits non-zero if a phase or an expected line is missing. Needs
qemu-system-x86 (and e2fsprogs for ``root``).
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

GUEST_IMAGES = Path(__file__).resolve().parent
BUSYBOX = Path("/bin/busybox")

# Console lines that mark boot phases, in boot order. The "pyhv guest: "
# lines come from guest_images/init and are documented in the README.
PHASE_MARKERS: dict[str, bytes] = {
    "banner": b"Linux version ",
    "run_init": b"Run /init as init process",
    "init_greeting": b"pyhv guest: init started",
}
REBOOT_MARKER = b"reboot: Restarting system"
# The command line pyhv uses by default, minus what only kvm_pvm hosts need.
BASE_APPEND = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1"


@dataclass
class BootResult:
    """What one QEMU boot printed, and when."""

    name: str
    ok: bool = False
    wall_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    console: bytes = b""

    def summary(self) -> dict[str, object]:
        return {"ok": self.ok, "wall_s": round(self.wall_s, 2),
                "phases_s": {k: round(v, 2) for k, v in self.phases.items()},
                "missing": self.missing}


def plain_initramfs(workdir: Path) -> Path:
    """The guest gets the plain cpio; pyhv decompresses it on the host too."""
    cpio = workdir / "initramfs.cpio"
    cpio.write_bytes(lzma.decompress((GUEST_IMAGES / "initramfs.cpio.xz").read_bytes()))
    return cpio


def plain_vmlinux(workdir: Path) -> Path:
    """The ELF vmlinux, which QEMU enters through its PVH note (XEN_ELFNOTE_PHYS32_ENTRY)."""
    vmlinux = workdir / "vmlinux"
    vmlinux.write_bytes(lzma.decompress((GUEST_IMAGES / "vmlinux.xz").read_bytes()))
    return vmlinux


def run_qemu(name: str, argv: list[str], expect: list[bytes], send_after: bytes | None,
             send: bytes, timeout_s: float) -> BootResult:
    """Run QEMU, timestamp console phases, type `send` once `send_after` shows."""
    result = BootResult(name)
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdin is not None and proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    console = bytearray()
    sent = send_after is None
    if sent and send:
        proc.stdin.write(send)
        proc.stdin.flush()
    try:
        while time.monotonic() - start < timeout_s:
            if not selector.select(timeout=0.2):
                if proc.poll() is not None:
                    break
                continue
            chunk = proc.stdout.read()
            if not chunk:
                break
            now = time.monotonic() - start
            if not console:
                result.phases["first_byte"] = now
            console += chunk
            for phase, marker in PHASE_MARKERS.items():
                if phase not in result.phases and marker in console:
                    result.phases[phase] = now
            if not sent and send_after is not None and send_after in console:
                # Typed only once the guest reads its console: a UART drops
                # what arrives before the driver opens the port.
                result.phases["input_sent"] = now
                proc.stdin.write(send)
                proc.stdin.flush()
                sent = True
            if REBOOT_MARKER in console and "reboot" not in result.phases:
                result.phases["reboot"] = now
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    result.wall_s = time.monotonic() - start
    result.console = bytes(console)
    wanted = [m for m in PHASE_MARKERS.values()] + expect + [REBOOT_MARKER]
    result.missing = [m.decode() for m in wanted if m not in console]
    result.ok = not result.missing and proc.returncode == 0
    return result


def qemu_argv(kernel: Path, initrd: Path, append: str, machine: list[str]) -> list[str]:
    return ["qemu-system-x86_64", "-accel", "tcg", *machine, "-m", "256",
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", append]


def check_cmd(kernel: Path, initrd: Path, extra: str, timeout_s: float) -> BootResult:
    append = f'{BASE_APPEND} {extra} pyhv.cmd="echo pyhv-check-$((6*7)); exit 3"'
    return run_qemu("cmd", qemu_argv(kernel, initrd, append, []),
                    [b"pyhv-check-42", b"pyhv guest: command exited with status 3"],
                    None, b"", timeout_s)


def check_shell(kernel: Path, initrd: Path, extra: str, timeout_s: float) -> BootResult:
    return run_qemu("shell", qemu_argv(kernel, initrd, f"{BASE_APPEND} {extra}", []),
                    [b"\nhi\r\n", b"pyhv guest: shell exited with status 0"],
                    b"pyhv:/# ", b"echo hi; exit\n", timeout_s)


def make_root_disk(workdir: Path) -> Path:
    """A small ext4 image whose /sbin/init proves the switch_root worked."""
    tree = workdir / "rootfs"
    for d in ("bin", "sbin", "dev", "proc", "sys"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, tree / "bin" / "busybox")
    init = tree / "sbin" / "init"
    init.write_text("#!/bin/busybox sh\n"
                    "/bin/busybox echo \"disk init running as PID $$\"\n"
                    "/bin/busybox mount -t proc proc /proc\n"
                    "/bin/busybox grep ' / ' /proc/mounts\n"
                    "/bin/busybox reboot -f\n")
    init.chmod(0o755)
    image = workdir / "root.ext4"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image), "16M"],
                   check=True, stdout=subprocess.DEVNULL)
    return image


def check_root(kernel: Path, initrd: Path, workdir: Path, extra: str,
               timeout_s: float) -> BootResult:
    image = make_root_disk(workdir)
    # microvm has virtio-mmio and, with ACPI off, puts virtio_mmio.device=
    # on the kernel command line itself, as pyhv does.
    machine = ["-M", "microvm,acpi=off,pic=on,pit=on,rtc=on,isa-serial=on",
               "-drive", f"id=root,file={image},format=raw,if=none",
               "-device", "virtio-blk-device,drive=root"]
    append = BASE_APPEND.replace("reboot=k", "reboot=t") + f" {extra} root=/dev/vda rw"
    return run_qemu("root", qemu_argv(kernel, initrd, append, machine),
                    [b"pyhv guest: switching root to /dev/vda (ext4, rw)",
                     b"disk init running as PID 1", b"/dev/vda / ext4 rw"],
                    None, b"", timeout_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("check", choices=["cmd", "shell", "root", "all"])
    parser.add_argument("--kernel", type=Path, default=None,
                        help="bzImage to boot (default: guest_images/bzImage)")
    parser.add_argument("--vmlinux", action="store_true",
                        help="boot guest_images/vmlinux.xz (decompressed) instead of the bzImage")
    parser.add_argument("--append", default="", help="extra kernel command-line words")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--json", type=Path, help="write the phase timings here")
    parser.add_argument("--console", action="store_true", help="print the console output")
    args = parser.parse_args()
    if shutil.which("qemu-system-x86_64") is None:
        print("qemu_check: qemu-system-x86_64 not found (apt-get install qemu-system-x86)",
              file=sys.stderr)
        return 2
    results: list[BootResult] = []
    with tempfile.TemporaryDirectory(prefix="pyhv-qemu-check-") as tmp:
        workdir = Path(tmp)
        initrd = plain_initramfs(workdir)
        if args.kernel is not None:
            kernel = args.kernel
        elif args.vmlinux:
            kernel = plain_vmlinux(workdir)
        else:
            kernel = GUEST_IMAGES / "bzImage"
        checks = ["cmd", "shell", "root"] if args.check == "all" else [args.check]
        for check in checks:
            if check == "cmd":
                results.append(check_cmd(kernel, initrd, args.append, args.timeout))
            elif check == "shell":
                results.append(check_shell(kernel, initrd, args.append, args.timeout))
            else:
                results.append(check_root(kernel, initrd, workdir, args.append, args.timeout))
    for result in results:
        if args.console:
            sys.stdout.write(result.console.decode(errors="replace"))
        phases = " ".join(f"{k}={v:.2f}s" for k, v in result.phases.items())
        status = "ok" if result.ok else "FAILED, missing: " + "; ".join(result.missing)
        print(f"{result.name}: {status}; {phases}; wall {result.wall_s:.2f}s")
    if args.json:
        args.json.write_text(json.dumps({r.name: r.summary() for r in results}, indent=2) + "\n")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
