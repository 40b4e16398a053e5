"""Software breakpoints: an int3 (0xCC, SDM Vol. 2A "INT n/INTO/INT3") over the original byte.

Breakpoints are kept by guest *physical* address, translated once when gdb inserts them, so a
guest that changes its page tables later (a kernel leaving its identity map) still gets its
original byte back. Reads through the stub show the original bytes, as gdb expects; writes
through the stub that cover a breakpoint update the saved byte and keep the int3 in place.
"""

from __future__ import annotations

from collections.abc import Callable

INT3 = 0xCC


class SoftwareBreakpoints:
    def __init__(self, read: Callable[[int, int], bytes], write: Callable[[int, bytes], None]) -> None:
        self._read = read  # (gpa, length) -> bytes
        self._write = write  # (gpa, data)
        self.original: dict[int, int] = {}  # gpa -> the byte the int3 covers

    def __contains__(self, gpa: int) -> bool:
        return gpa in self.original

    def __len__(self) -> int:
        return len(self.original)

    def insert(self, gpa: int) -> None:
        if gpa in self.original:
            return  # gdb may insert the same location twice (two breakpoints, one address)
        self.original[gpa] = self._read(gpa, 1)[0]
        self._write(gpa, bytes([INT3]))

    def remove(self, gpa: int) -> None:
        byte = self.original.pop(gpa, None)
        if byte is not None:
            self._write(gpa, bytes([byte]))

    def clear(self) -> None:
        for gpa in list(self.original):
            self.remove(gpa)

    def shadow(self, gpa: int, data: bytes) -> bytes:
        """`data` read at `gpa` with each int3 of ours replaced by the byte it covers."""
        if not self.original:
            return data
        patched = bytearray(data)
        for address, byte in self.original.items():
            if gpa <= address < gpa + len(data):
                patched[address - gpa] = byte
        return bytes(patched)

    def write_through(self, gpa: int, data: bytes) -> bytes:
        """What to store for a debugger write of `data` at `gpa`: originals updated, int3 kept."""
        if not self.original:
            return data
        patched = bytearray(data)
        for address in self.original:
            if gpa <= address < gpa + len(data):
                self.original[address] = patched[address - gpa]
                patched[address - gpa] = INT3
        return bytes(patched)
