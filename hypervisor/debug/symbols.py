"""Kernel symbols for post-mortems: address -> `symbol+0x1a/0x80`, as the kernel's own oopses print.

Two sources: a `System.map` (the `nm -n` listing Linux's build writes: `ffffffff81000000 T _text`)
and an ELF with a symbol table (a `vmlinux`, read with pyelftools, the optional extra
`pyhv[symbols]`). Lookup is a bisect over the sorted start addresses. A symbol's extent is its ELF
`st_size` when known, else up to the next symbol: System.map has no sizes, so an address past the
last text symbol (`_etext`) belongs to none.
"""

from __future__ import annotations

import bisect
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from hypervisor.errors import ConfigError

log = logging.getLogger(__name__)

ELF_MAGIC = b"\x7fELF"
SHF_EXECINSTR = 0x4  # ELF gABI, "Section Attribute Flags"
MAX_SYMBOL_FILE = 512 * 1024 * 1024  # a vmlinux with debug info is a few hundred MiB
# nm's type letters for code: T/t text, W/w weak (System.map of Linux lists code as t/T/W).
TEXT_TYPES = frozenset("TtWw")
_MAP_LINE = re.compile(r"^([0-9a-fA-F]{1,16})\s+([A-Za-z?])\s+(\S+)")


@dataclass(frozen=True)
class Symbol:
    address: int
    name: str
    size: int  # 0: unknown (up to the next symbol)
    is_text: bool


class SymbolTable:
    """Sorted symbols with address lookup."""

    def __init__(self, symbols: list[Symbol], source: str = "") -> None:
        # Several names often share an address (aliases, `_text` and `startup_64`): code before data,
        # and a name without a leading underscore (a function, not a linker marker) wins.
        unique: dict[int, Symbol] = {}
        for symbol in sorted(symbols, key=lambda s: (s.address, not s.is_text, s.name.startswith("_"))):
            unique.setdefault(symbol.address, symbol)
        self._symbols = list(unique.values())
        self._addresses = [symbol.address for symbol in self._symbols]
        self.source = source

    def __len__(self) -> int:
        return len(self._symbols)

    def lookup(self, address: int, text_only: bool = False) -> tuple[Symbol, int] | None:
        """The symbol containing `address` and the offset into it, or None."""
        index = bisect.bisect_right(self._addresses, address) - 1
        if index < 0:
            return None
        symbol = self._symbols[index]
        offset = address - symbol.address
        if symbol.size:
            if offset >= symbol.size:
                return None
        elif index + 1 == len(self._symbols):
            return None  # past the last symbol: its extent is unknown
        if text_only and not symbol.is_text:
            return None
        return symbol, offset

    def is_text(self, address: int) -> bool:
        return self.lookup(address, text_only=True) is not None

    def format(self, address: int) -> str:
        """`start_kernel+0x1a/0x80` (size shown when known), or the bare hex address."""
        found = self.lookup(address)
        if found is None:
            return f"{address:#x}"
        symbol, offset = found
        size = symbol.size or self._extent(symbol)
        return f"{symbol.name}+{offset:#x}" + (f"/{size:#x}" if size else "")

    def _extent(self, symbol: Symbol) -> int:
        index = bisect.bisect_right(self._addresses, symbol.address)
        return self._addresses[index] - symbol.address if index < len(self._addresses) else 0


def parse_system_map(text: str, source: str = "System.map") -> SymbolTable:
    """Symbols of a System.map; ConfigError when no line looks like one."""
    symbols = []
    bad = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _MAP_LINE.match(line)
        if match is None:
            bad += 1
            continue
        address, kind, name = match.groups()
        if kind in "aAU":  # absolute and undefined symbols locate no code
            continue
        symbols.append(Symbol(int(address, 16), name, 0, kind in TEXT_TYPES))
    if not symbols:
        raise ConfigError(f"--kernel-symbols {source}: no `ADDRESS TYPE NAME` lines (not a System.map?)")
    if bad:
        log.warning("%s: %d lines are not symbols and were skipped", source, bad)
    return SymbolTable(symbols, source)


def parse_elf_symbols(path: Path) -> SymbolTable:
    """Function and object symbols of an ELF's .symtab (pyelftools)."""
    try:
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile
        from elftools.elf.sections import SymbolTableSection
    except ImportError:
        raise ConfigError(
            f"--kernel-symbols {path} is an ELF file: reading its symbols needs pyelftools "
            "(pip install 'pyhv[symbols]'), or give a System.map instead"
        ) from None
    symbols = []
    try:
        with open(path, "rb") as stream:
            elf = ELFFile(stream)
            # Code is what lies in an executable section (SHF_EXECINSTR), whatever the symbol's
            # type: the kernel's assembly entry points are often STT_NOTYPE.
            executable = {index for index, section in enumerate(elf.iter_sections())
                          if section["sh_flags"] & SHF_EXECINSTR}  # fmt: skip
            for section in elf.iter_sections():
                if not isinstance(section, SymbolTableSection):
                    continue
                for entry in section.iter_symbols():
                    kind = entry["st_info"]["type"]
                    if kind not in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE") or not entry.name:
                        continue
                    section_index = entry["st_shndx"]
                    if not isinstance(section_index, int):  # SHN_UNDEF, SHN_ABS, SHN_COMMON
                        continue
                    symbols.append(Symbol(int(entry["st_value"]), entry.name, int(entry["st_size"]),
                                          section_index in executable))  # fmt: skip
    except (ELFError, ValueError, KeyError, IndexError, OSError) as error:
        raise ConfigError(f"--kernel-symbols {path}: not a readable ELF file ({error})") from error
    if not symbols:
        raise ConfigError(f"--kernel-symbols {path}: the ELF file has no symbol table (stripped?)")
    return SymbolTable(symbols, str(path))


def load_symbols(path: Path) -> SymbolTable:
    """A System.map or an ELF with symbols; one ConfigError line for anything else."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ConfigError(f"--kernel-symbols {path} is not a regular file")
        if size > MAX_SYMBOL_FILE:
            raise ConfigError(f"--kernel-symbols {path} is larger than {MAX_SYMBOL_FILE >> 20} MiB")
        with open(path, "rb") as stream:
            head = stream.read(4)
            if head == ELF_MAGIC:
                return parse_elf_symbols(path)
            text = (head + stream.read()).decode("ascii", errors="replace")
    except FileNotFoundError:
        raise ConfigError(f"--kernel-symbols {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"--kernel-symbols {path} is not readable (permission denied)") from None
    except OSError as error:
        raise ConfigError(f"cannot read --kernel-symbols {path}: {error.strerror}") from error
    return parse_system_map(text, str(path))
