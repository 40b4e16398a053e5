"""Builds the test guests in this folder from source with the system gcc and ld.

Each `NAME.S` (or freestanding `NAME.c`) becomes a flat binary linked at GUEST_BASE, cached in
`.build/` under a hash of its sources and the commands, so it is rebuilt only when a source
changes. `with_parameters` patches the parameter block every guest starts with (common.S).
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_DIR = HERE / ".build"
GUEST_BASE = 0x1000
PARAMETER_FORMAT = "<BBHHQ"  # exit code, mode, port, padding, count (after the 2-byte jmp)
PARAMETER_OFFSET = 2

MODE_GREET_AND_MMIO = 0
MODE_SPIN = 1
MODE_OUT_FOREVER = 2
MODE_OUT_COUNT = 3
MODE_MMIO_COUNT = 4
MODE_PIO_WIDE_COUNT = 5  # 32-bit in and out at the parameter port, count times each
MODE_SMP_COUNT = 6  # every vCPU: gate, then count 32-bit writes of its APIC ID tag + i (common.S)
MODE_SMP_FOREVER = 7  # every vCPU: gate, then its tag forever; with a count, vCPUs > 0 then triple-fault

ASSEMBLE = ["gcc", "-c", "-m64", "-nostdlib", "-ffreestanding", "-fno-pic", "-I", str(HERE)]
COMPILE_C = [
    "gcc", "-c", "-m64", "-O2", "-nostdlib", "-ffreestanding", "-fno-pic", "-fno-stack-protector",
    "-mno-red-zone", "-mgeneral-regs-only", "-fno-asynchronous-unwind-tables", "-I", str(HERE),
]  # fmt: skip
LINK_ELF = ["ld", "-m", "elf_x86_64", "-nostdlib", "-Ttext", hex(GUEST_BASE), "-e", "_start"]
MULTIBOOT_LINK = ["ld", "-m", "elf_i386", "-nostdlib", "-Ttext", "0x100000", "-e", "_start"]
# Code, data and bss must end below the user stack (common.S: USER_STACK_TOP 0x6000, leaving
# 4 KiB of stack); the page tables start at 0x8000.
FOOTPRINT_LIMIT = 0x5000


class ToolMissing(RuntimeError):
    """gcc or ld is not installed: tests that need a guest skip with this reason."""


def _sources(name: str) -> list[Path]:
    main = [p for p in (HERE / f"{name}.S", HERE / f"{name}.c") if p.exists()]
    if not main:
        raise FileNotFoundError(f"no test guest named {name!r} in {HERE}")
    return main + sorted(HERE.glob("*.h")) + [HERE / "common.S", HERE / "c_entry.S"]


def build_guest(name: str) -> Path:
    """The path of the built flat binary of guest `name`, building it when needed."""
    for tool in ("gcc", "ld", "objcopy", "nm"):
        if shutil.which(tool) is None:
            raise ToolMissing(f"{tool} is not installed; it builds the test guests")
    digest = hashlib.sha256()
    for source in _sources(name):
        digest.update(source.name.encode() + source.read_bytes())
    digest.update(repr((ASSEMBLE, COMPILE_C, LINK_ELF)).encode())
    output = BUILD_DIR / f"{name}-{digest.hexdigest()[:16]}.bin"
    if output.exists():
        return output
    BUILD_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        objects = []
        main = _sources(name)[0]
        if main.suffix == ".c":
            entry = HERE / "c_entry.S"
            objects.append(_run(ASSEMBLE, entry, Path(tmp) / "entry.o"))
            objects.append(_run(COMPILE_C, main, Path(tmp) / "main.o"))
        else:
            objects.append(_run(ASSEMBLE, main, Path(tmp) / "main.o"))
        partial = Path(tmp) / "guest.bin"
        elf = Path(tmp) / "guest.elf"
        link = subprocess.run([*LINK_ELF, "-o", str(elf), *map(str, objects)], capture_output=True, text=True)
        if link.returncode:
            raise RuntimeError(f"linking {name} failed:\n{link.stderr}")
        _check_footprint(name, elf)
        subprocess.run(["objcopy", "-O", "binary", str(elf), str(partial)], check=True, capture_output=True)
        shutil.move(str(partial), output)
    return output


def _check_footprint(name: str, elf: Path) -> None:
    """Refuses a guest whose code, data or bss would run into its stack or page tables."""
    symbols = subprocess.run(["nm", "-n", str(elf)], capture_output=True, text=True, check=True).stdout
    addresses = [int(line.split()[0], 16) for line in symbols.splitlines() if line[:1].isalnum() and " " in line]
    end = max(addresses, default=GUEST_BASE)
    if end >= FOOTPRINT_LIMIT:
        raise RuntimeError(f"test guest {name} reaches {end:#x}; it must end below {FOOTPRINT_LIMIT:#x}")


def _run(command: list[str], source: Path, output: Path) -> Path:
    result = subprocess.run([*command, "-o", str(output), str(source)], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"building {source.name} failed:\n{result.stderr}")
    return output


def build_multiboot_guest(name: str) -> Path:
    """An ELF32 multiboot kernel from `NAME.S`, linked at 1 MiB (where multiboot loads it)."""
    for tool in ("gcc", "ld"):
        if shutil.which(tool) is None:
            raise ToolMissing(f"{tool} is not installed; it builds the test guests")
    source = HERE / f"{name}.S"
    digest = hashlib.sha256(source.read_bytes() + repr(MULTIBOOT_LINK).encode()).hexdigest()[:16]
    output = BUILD_DIR / f"{name}-{digest}.elf"
    if output.exists():
        return output
    BUILD_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        obj = _run(["gcc", "-c", "-m32", "-nostdlib", "-ffreestanding"], source, Path(tmp) / "main.o")
        elf = Path(tmp) / "guest.elf"
        link = subprocess.run([*MULTIBOOT_LINK, "-o", str(elf), str(obj)], capture_output=True, text=True)
        if link.returncode:
            raise RuntimeError(f"linking {name} failed:\n{link.stderr}")
        shutil.move(str(elf), output)
    return output


def with_parameters(image: bytes, exit_code: int = 0, mode: int = 0, port: int = 0, count: int = 0) -> bytes:
    """`image` with its parameter block set (see common.S)."""
    block = struct.pack(PARAMETER_FORMAT, exit_code, mode, port, 0, count)
    return image[:PARAMETER_OFFSET] + block + image[PARAMETER_OFFSET + len(block) :]


def guest_image(name: str, **parameters: int) -> bytes:
    return with_parameters(build_guest(name).read_bytes(), **parameters)
