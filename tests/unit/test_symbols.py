"""Kernel symbols: System.map and ELF symbol tables, address -> symbol+offset."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hypervisor.debug.symbols import load_symbols, parse_system_map
from hypervisor.errors import ConfigError

SYSTEM_MAP = """\
0000000000000000 A fixed_percpu_data
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81000100 t secondary_startup_64
ffffffff81001000 T start_kernel
ffffffff81001080 W arch_call_rest_init
ffffffff81001100 T panic
ffffffff81002000 D init_task
ffffffff81003000 T _etext
"""


def test_lookup_and_format() -> None:
    table = parse_system_map(SYSTEM_MAP)
    assert table.format(0xFFFFFFFF8100101A) == "start_kernel+0x1a/0x80"
    assert table.format(0xFFFFFFFF81000000) == "startup_64+0x0/0x100"  # the first alias wins (not _text)
    assert table.format(0xFFFFFFFF81001180) == "panic+0x80/0xf00"
    assert table.format(0x1000) == "0x1000"  # before every symbol
    assert table.format(0xFFFFFFFF81003010) == "0xffffffff81003010"  # past the last one: unknown extent


def test_text_symbols_only_for_return_addresses() -> None:
    table = parse_system_map(SYSTEM_MAP)
    assert table.is_text(0xFFFFFFFF81001090)  # W: weak code
    assert not table.is_text(0xFFFFFFFF81002010)  # D: data
    assert len(table) == 7  # the absolute symbol is dropped, aliases merged


def test_bad_lines_are_skipped_with_a_warning(caplog) -> None:
    table = parse_system_map(SYSTEM_MAP + "garbage line\n\n")
    assert table.format(0xFFFFFFFF81001000) == "start_kernel+0x0/0x80"
    assert "1 lines are not symbols" in caplog.text


@pytest.mark.parametrize("content", [b"", b"hello world\n", b"\x00\x01\x02" * 100])
def test_a_file_that_is_not_a_map(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "System.map"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="not a System.map"):
        load_symbols(path)


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_symbols(tmp_path / "absent")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_symbols(tmp_path)


def test_system_map_file(tmp_path: Path) -> None:
    path = tmp_path / "System.map"
    path.write_text(SYSTEM_MAP)
    assert load_symbols(path).format(0xFFFFFFFF81000104) == "secondary_startup_64+0x4/0xf00"


def build_elf(tmp_path: Path, strip: bool = False) -> Path:
    if shutil.which("gcc") is None or shutil.which("ld") is None:
        pytest.skip("gcc and ld build the ELF test file")
    source = tmp_path / "k.c"
    source.write_text(
        "int counter;\nvoid helper(void) { counter++; }\nvoid start_kernel(void) { helper(); helper(); }\n"
    )
    obj, elf = tmp_path / "k.o", tmp_path / "vmlinux"
    subprocess.run(["gcc", "-c", "-O1", "-fno-pic", "-ffreestanding", "-o", str(obj), str(source)], check=True)
    command = ["ld", "-e", "start_kernel", "-Ttext", "0xffffffff81000000", "-o", str(elf), str(obj)]
    subprocess.run(command + (["-s"] if strip else []), check=True, capture_output=True)
    return elf


def test_elf_symbols(tmp_path: Path) -> None:
    pytest.importorskip("elftools", reason="pyelftools (the optional extra pyhv[symbols]) is not installed")
    elf = build_elf(tmp_path)
    table = load_symbols(elf)
    listing = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout.split()
    addresses = {listing[i + 2]: int(listing[i], 16) for i in range(0, len(listing) - 2, 3)}
    assert table.format(addresses["start_kernel"] + 1).startswith("start_kernel+0x1/")
    assert table.is_text(addresses["helper"])
    assert not table.is_text(addresses["counter"])  # data: never a return address


def test_stripped_elf_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("elftools", reason="pyelftools (the optional extra pyhv[symbols]) is not installed")
    with pytest.raises(ConfigError, match="no symbol table"):
        load_symbols(build_elf(tmp_path, strip=True))


def test_truncated_elf_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("elftools", reason="pyelftools (the optional extra pyhv[symbols]) is not installed")
    path = tmp_path / "vmlinux"
    path.write_bytes(build_elf(tmp_path).read_bytes()[:100])
    with pytest.raises(ConfigError, match="vmlinux"):
        load_symbols(path)


def test_elf_without_pyelftools(tmp_path: Path, monkeypatch) -> None:
    import sys

    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF" + bytes(60))
    for name in ("elftools", "elftools.elf", "elftools.elf.elffile", "elftools.common.exceptions"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=r"pyhv\[symbols\]"):
        load_symbols(path)
