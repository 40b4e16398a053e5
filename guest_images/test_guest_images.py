"""Checks of the committed guest outputs and of the init script.

Run with `python3 -m pytest guest_images/test_guest_images.py -q` (the repository's testpaths
cover tests/ only). The QEMU boots are marked slow; everything else takes about a second.
"""

from __future__ import annotations

import hashlib
import lzma
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

GUEST_IMAGES = Path(__file__).resolve().parent
BUSYBOX = Path("/bin/busybox")

# ELF (System V gABI): class, machine, segment and note types.
ELFCLASS64 = 2
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
# xen/include/public/elfnote.h: the 32-bit PVH entry point.
XEN_ELFNOTE_PHYS32_ENTRY = 18
# Documentation/x86/boot.rst: header fields and flags.
BOOT_HEADER_MAGIC = b"HdrS"
XLF_KERNEL_64 = 1 << 0
# The legacy LZ4 frame the kernel's LZ4 payload uses (lib/decompress_unlz4.c).
LZ4_LEGACY_MAGIC = 0x184C2102
# newc cpio (Documentation/driver-api/early-userspace/buffer-format.rst).
CPIO_NEWC_MAGIC = b"070701"
S_IFMT, S_IFCHR, S_IFREG, S_IFLNK = 0o170000, 0o020000, 0o100000, 0o120000
# The kernel runs with a 16 MiB physical start (CONFIG_PHYSICAL_START default).
KERNEL_PHYSICAL_START = 0x1000000
# Every byte of the initramfs is unpacked at emulated speed on kvm_pvm hosts.
INITRAMFS_SIZE_LIMIT = 3 * 1024 * 1024
OUTPUTS_SIZE_LIMIT = 8 * 1024 * 1024


def read_output(name: str) -> bytes:
    path = GUEST_IMAGES / name
    if not path.is_file():
        pytest.skip(f"{name} has not been built (guest_images/build.sh)")
    return path.read_bytes()


def manifest_hashes() -> dict[str, str]:
    hashes = {}
    for line in (GUEST_IMAGES / "MANIFEST").read_text().splitlines():
        if line.startswith("#") or "  " not in line:
            continue
        digest, name = line.split("  ", 1)
        hashes[name.split(" ")[0]] = digest
    return hashes


def test_manifest_matches_the_committed_outputs() -> None:
    hashes = manifest_hashes()
    for name in ("vmlinux.xz", "bzImage", "initramfs.cpio.xz"):
        assert hashlib.sha256(read_output(name)).hexdigest() == hashes[name], name
    assert hashlib.sha256(lzma.decompress(read_output("initramfs.cpio.xz"))).hexdigest() == \
        hashes["initramfs.cpio"]


def test_outputs_stay_small() -> None:
    total = sum(len(read_output(n)) for n in ("vmlinux.xz", "bzImage", "initramfs.cpio.xz"))
    assert total < OUTPUTS_SIZE_LIMIT


def elf_notes(image: bytes, offset: int, size: int) -> list[tuple[int, bytes, bytes]]:
    notes, end = [], offset + size
    while offset + 12 <= end:
        namesz, descsz, note_type = struct.unpack_from("<III", image, offset)
        name_start = offset + 12
        desc_start = name_start + (namesz + 3) // 4 * 4
        notes.append((note_type, image[name_start:name_start + namesz].rstrip(b"\0"),
                      image[desc_start:desc_start + descsz]))
        offset = desc_start + (descsz + 3) // 4 * 4
    return notes


def test_vmlinux_is_a_loadable_elf_with_a_pvh_note() -> None:
    image = lzma.decompress(read_output("vmlinux.xz"))
    assert image[:4] == b"\x7fELF" and image[4] == ELFCLASS64
    machine, = struct.unpack_from("<H", image, 18)
    assert machine == EM_X86_64
    entry, phoff = struct.unpack_from("<QQ", image, 24)
    phentsize, phnum = struct.unpack_from("<HH", image, 54)
    loads, pvh_entries = [], []
    for index in range(phnum):
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", image, phoff + index * phentsize)
        if p_type == PT_LOAD:
            assert p_offset + p_filesz <= len(image) and p_filesz <= p_memsz
            loads.append(p_paddr)
        elif p_type == PT_NOTE:
            pvh_entries += [desc for kind, name, desc in elf_notes(image, p_offset, p_filesz)
                            if kind == XEN_ELFNOTE_PHYS32_ENTRY and name == b"Xen"]
    # Not relocatable, no KASLR: it runs where it is loaded, from 16 MiB up.
    assert loads and min(loads) == KERNEL_PHYSICAL_START
    assert entry == KERNEL_PHYSICAL_START
    assert len(pvh_entries) == 1
    pvh_entry, = struct.unpack("<I", pvh_entries[0][:4])
    assert KERNEL_PHYSICAL_START <= pvh_entry < KERNEL_PHYSICAL_START + 64 * 1024 * 1024


def test_bzimage_header_and_lz4_payload() -> None:
    image = read_output("bzImage")
    assert image[0x202:0x206] == BOOT_HEADER_MAGIC
    version, = struct.unpack_from("<H", image, 0x206)
    assert version >= 0x20C  # 64-bit entry point (boot protocol 2.12)
    xloadflags, = struct.unpack_from("<H", image, 0x236)
    assert xloadflags & XLF_KERNEL_64
    setup_sects = image[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    payload_start = (setup_sects + 1) * 512 + payload_offset
    assert payload_start + payload_length <= len(image)
    magic, = struct.unpack_from("<I", image, payload_start)
    assert magic == LZ4_LEGACY_MAGIC


def cpio_entries(archive: bytes) -> dict[str, tuple[int, int, bytes]]:
    """name -> (mode, rdev as major << 8 | minor, data) for a newc archive."""
    entries, offset = {}, 0
    while True:
        header = archive[offset:offset + 110]
        assert header[:6] == CPIO_NEWC_MAGIC
        fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rdevmajor, rdevminor, namesize = (fields[1], fields[6], fields[9],
                                                          fields[10], fields[11])
        name_start = offset + 110
        name = archive[name_start:name_start + namesize - 1].decode()
        data_start = (name_start + namesize + 3) // 4 * 4
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, rdevmajor << 8 | rdevminor, archive[data_start:data_start + filesize])
        offset = (data_start + filesize + 3) // 4 * 4


def test_initramfs_holds_busybox_init_and_console() -> None:
    archive = lzma.decompress(read_output("initramfs.cpio.xz"))
    assert len(archive) < INITRAMFS_SIZE_LIMIT
    entries = cpio_entries(archive)
    mode, _, data = entries["init"]
    assert mode & S_IFMT == S_IFREG and mode & 0o111
    assert data == (GUEST_IMAGES / "init").read_bytes()
    mode, _, data = entries["bin/busybox"]
    assert mode & S_IFMT == S_IFREG and data[:4] == b"\x7fELF"
    mode, rdev, _ = entries["dev/console"]
    assert mode & S_IFMT == S_IFCHR and rdev == (5 << 8 | 1)
    mode, _, target = entries["bin/sh"]
    # gen_init_cpio stores the link target with its terminating NUL.
    assert mode & S_IFMT == S_IFLNK and target.rstrip(b"\0") == b"/bin/busybox"
    mode, _, data = entries["etc/fstab"]
    assert mode & S_IFMT == S_IFREG and data == (GUEST_IMAGES / "fstab").read_bytes()
    assert [line.split()[1] for line in data.decode().splitlines() if not line.startswith("#")] == [
        "/proc", "/sys", "/dev"
    ]
    # Nothing but busybox, init, fstab, directories, symlinks and the console node.
    regular = sorted(n for n, (m, _, _) in entries.items() if m & S_IFMT == S_IFREG)
    assert regular == ["bin/busybox", "etc/fstab", "init"]


def init_functions() -> str:
    """The init script's helper functions, without its top-level commands."""
    script = (GUEST_IMAGES / "init").read_text()
    start = script.index("cmdline_value() {")
    end = script.index("# try_switch_root DEVICE")
    return script[start:end]


@pytest.fixture
def busybox_sh() -> list[str]:
    if not BUSYBOX.is_file():
        pytest.skip("needs /bin/busybox (apt-get install busybox-static)")
    return [str(BUSYBOX), "sh", "-c"]


def run_sh(busybox_sh: list[str], cmdline: str, body: str) -> str:
    script = f"CMDLINE='{cmdline}'\n{init_functions()}\n{body}"
    return subprocess.run([*busybox_sh, script], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize(
    ("cmdline", "name", "expected"),
    [
        ('console=ttyS0 root=/dev/vda rw', "root", "/dev/vda"),
        ('root=/dev/vdb', "root", "/dev/vdb"),
        ('a=1 pyhv.cmd="echo hi; ls -l /" panic=-1', "pyhv.cmd", "echo hi; ls -l /"),
        ('pyhv.cmd=uname', "pyhv.cmd", "uname"),
        ('pyhv.cmd64=ZWNobyBoaQo= x=1', "pyhv.cmd64", "ZWNobyBoaQo="),
        ('xroot=/dev/vdz root=/dev/vda', "root", "/dev/vda"),
        ('console=ttyS0', "root", "<absent>"),
        ('pyhv.cmdx=1', "pyhv.cmd", "<absent>"),
    ],
)
def test_init_reads_command_line_values(busybox_sh: list[str], cmdline: str, name: str,
                                        expected: str) -> None:
    output = run_sh(busybox_sh, cmdline, f'if cmdline_value {name}; then printf %s "$value"; '
                                          'else printf "<absent>"; fi')
    assert output == expected


def test_init_reads_command_line_flags(busybox_sh: list[str]) -> None:
    body = 'for f in rw ro quiet; do cmdline_flag $f && echo $f; done; true'
    assert run_sh(busybox_sh, "root=/dev/vda rw quietx", body).split() == ["rw"]


def test_init_script_parses(busybox_sh: list[str]) -> None:
    subprocess.run([str(BUSYBOX), "sh", "-n", str(GUEST_IMAGES / "init")], check=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kernel_format", ["bzImage", "vmlinux"])
def test_qemu_tcg_boots_cmd_shell_and_root(kernel_format: str) -> None:
    if shutil.which("qemu-system-x86_64") is None or shutil.which("mke2fs") is None:
        pytest.skip("needs qemu-system-x86_64 and mke2fs (apt-get install qemu-system-x86 e2fsprogs)")
    read_output("bzImage")
    extra = ["--vmlinux"] if kernel_format == "vmlinux" else []
    result = subprocess.run([sys.executable, str(GUEST_IMAGES / "qemu_check.py"), "all", "--timeout", "240",
                             *extra], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
