"""A minimal ELF reader for kernels: header, PT_LOAD segments, PT_NOTE notes (ELF32 and ELF64).

Structures from the System V ABI "gABI" chapter 4 (ELF header, program header) and chapter 5
(note sections). Every offset and size is checked against the file before use: a kernel file is
untrusted input and a bad one must end in a BootError, not an IndexError.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypervisor.errors import BootError
from hypervisor.memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
EI_CLASS, EI_DATA = 4, 5
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4

# (header format after e_ident, program header format, program header size) per class.
# ELF64 phdr: type, flags, offset, vaddr, paddr, filesz, memsz, align.
# ELF32 phdr: type, offset, vaddr, paddr, filesz, memsz, flags, align.
_ELF_HEADER = {ELFCLASS32: "<HHIIIIIHHHHHH", ELFCLASS64: "<HHIQQQIHHHHHH"}
_PROGRAM_HEADER = {ELFCLASS32: ("<IIIIIIII", 32), ELFCLASS64: ("<IIQQQQQQ", 56)}
E_IDENT_SIZE = 16


@dataclass(frozen=True)
class Segment:
    """One program header: `offset`/`file_size` in the file, `memory_size` at `paddr`/`vaddr`."""

    type: int
    offset: int
    vaddr: int
    paddr: int
    file_size: int
    memory_size: int


@dataclass(frozen=True)
class Note:
    name: bytes  # without the terminating NUL
    type: int
    desc: bytes


@dataclass(frozen=True)
class ElfImage:
    elf_class: int
    machine: int
    entry: int
    segments: tuple[Segment, ...]
    data: bytes

    @property
    def loads(self) -> list[Segment]:
        return [segment for segment in self.segments if segment.type == PT_LOAD and segment.memory_size]

    def physical_range(self) -> tuple[int, int]:
        """[lowest p_paddr, highest p_paddr + p_memsz) over the PT_LOAD segments."""
        loads = self.loads
        return min(s.paddr for s in loads), max(s.paddr + s.memory_size for s in loads)

    def holds_code_at(self, physical: int) -> bool:
        """Whether `physical` lies in the file-backed bytes of a PT_LOAD segment. An entry point
        must: one outside every segment, or in a segment's zero-filled tail (p_memsz beyond
        p_filesz, gABI "Program Header"), would start the vCPU on bytes no kernel put there."""
        return any(s.paddr <= physical < s.paddr + s.file_size for s in self.loads)

    def physical_entry(self) -> int:
        """e_entry as a physical address.

        A Linux vmlinux links at virtual 0xffffffff81000000 but loads at physical 0x1000000;
        its e_entry (phys_startup_64) is already physical. Other kernels give a virtual entry.
        So: an entry inside a segment's virtual range is translated through that segment; one
        inside a physical range is used as it is. Either way it must land in loaded bytes.
        """
        for segment in self.loads:
            if segment.vaddr <= self.entry < segment.vaddr + segment.file_size:
                return self.entry - segment.vaddr + segment.paddr
        if self.holds_code_at(self.entry):
            return self.entry
        raise BootError(f"the ELF entry point {self.entry:#x} is outside every loadable segment's contents")

    def notes(self) -> list[Note]:
        result: list[Note] = []
        for segment in self.segments:
            if segment.type == PT_NOTE:
                result.extend(_parse_notes(self.data[segment.offset : segment.offset + segment.file_size]))
        return result


def _align4(value: int) -> int:
    return (value + 3) & ~3


def _parse_notes(blob: bytes) -> list[Note]:
    """Notes: namesz, descsz, type (u32 each), name and desc each padded to 4 bytes (gABI §5)."""
    notes = []
    offset = 0
    while offset + 12 <= len(blob):
        name_size, desc_size, note_type = struct.unpack_from("<III", blob, offset)
        name_start = offset + 12
        desc_start = name_start + _align4(name_size)
        desc_end = desc_start + desc_size
        if desc_end > len(blob):
            raise BootError("the kernel's ELF note segment is truncated")
        notes.append(
            Note(blob[name_start : name_start + name_size].rstrip(b"\0"), note_type, blob[desc_start:desc_end])
        )
        offset = desc_start + _align4(desc_size)
    return notes


def parse_elf(data: bytes, name: str = "the kernel") -> ElfImage:
    """Parse and bounds-check the ELF header and program headers of `data`."""
    if len(data) < E_IDENT_SIZE or data[:4] != ELF_MAGIC:
        raise BootError(f"{name} is not an ELF file")
    elf_class = data[EI_CLASS]
    if elf_class not in _ELF_HEADER:
        raise BootError(f"{name} has an unknown ELF class {elf_class}")
    if data[EI_DATA] != ELFDATA2LSB:
        raise BootError(f"{name} is a big-endian ELF file; x86 kernels are little-endian")
    header_format = _ELF_HEADER[elf_class]
    if len(data) < E_IDENT_SIZE + struct.calcsize(header_format):
        raise BootError(f"{name} is truncated inside its ELF header")
    (_type, machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_rest) = struct.unpack_from(
        header_format, data, E_IDENT_SIZE
    )
    program_format, program_size = _PROGRAM_HEADER[elf_class]
    if phnum == 0:
        raise BootError(f"{name} has no program headers (is it a relocatable object, not a kernel?)")
    if phentsize < program_size:
        raise BootError(f"{name} has program headers of {phentsize} bytes, expected {program_size}")
    if phoff + phnum * phentsize > len(data):
        raise BootError(f"{name} is truncated: its program headers end beyond the file")

    segments = []
    for index in range(phnum):
        fields = struct.unpack_from(program_format, data, phoff + index * phentsize)
        if elf_class == ELFCLASS64:
            p_type, _p_flags, offset, vaddr, paddr, file_size, memory_size, _align = fields
        else:
            p_type, offset, vaddr, paddr, file_size, memory_size, _p_flags, _align = fields
        if p_type in (PT_LOAD, PT_NOTE) and offset + file_size > len(data):
            raise BootError(
                f"{name} is truncated: segment {index} ends at {offset + file_size:#x}, "
                f"beyond the file's {len(data):#x} bytes"
            )
        if p_type == PT_LOAD and file_size > memory_size:
            raise BootError(f"{name} is corrupt: segment {index} has p_filesz > p_memsz")
        segments.append(Segment(p_type, offset, vaddr, paddr, file_size, memory_size))
    image = ElfImage(elf_class, machine, entry, tuple(segments), data)
    if not image.loads:
        raise BootError(f"{name} has no loadable (PT_LOAD) segment")
    return image


def load_segments(memory: GuestMemory, image: ElfImage, name: str = "the kernel") -> tuple[int, int]:
    """Copy every PT_LOAD segment to its p_paddr, zero-fill its bss; return the range covered."""
    for segment in image.loads:
        if not memory.contains(segment.paddr, segment.memory_size):
            raise BootError(
                f"{name} wants {segment.memory_size:#x} bytes at physical {segment.paddr:#x}, "
                f"outside the guest's {memory.size // (1024 * 1024)} MiB of RAM"
            )
    source = memoryview(image.data)
    for segment in image.loads:
        target = memory.view(segment.paddr, segment.memory_size)
        # Through a memoryview: slicing the bytes would copy a 50 MB kernel once more on the way.
        target[: segment.file_size] = source[segment.offset : segment.offset + segment.file_size]
        target[segment.file_size :] = bytes(segment.memory_size - segment.file_size)
    return image.physical_range()
