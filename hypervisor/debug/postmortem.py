"""Post-mortems: what a crashed guest looked like when it stopped.

Collected after the vCPU threads have stopped (`Machine.wait()` returned: no KVM_RUN is in
progress, so registers are final) and before `Machine.close()` (registers need the vCPU fds):
every vCPU's registers and a summary of its system registers, the 16 bytes at RIP read through
the guest's page tables and their decoding, words on the stack that point into kernel text
(return addresses, when symbols are known), the last exits that reached Python
(`Machine(..., exit_history=N)`) and the console tail. hypervisor.debug.postmortem_files writes
it as files and as the stderr summary.

Everything is read, nothing is changed; a part that cannot be read (an unmapped RIP, a vCPU
whose registers fail) is reported as such and the rest is still collected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

from hypervisor.debug.trace import ExitRecord, exit_record
from hypervisor.errors import HypervisorError
from hypervisor.outcome import POST_MORTEM_EXIT_HISTORY, Outcome

if TYPE_CHECKING:
    from collections.abc import Iterable

    from hypervisor.debug.console_observer import ConsoleObserver
    from hypervisor.debug.symbols import SymbolTable
    from hypervisor.kvm.registers import SystemRegisters
    from hypervisor.vcpu.events import ExitEvent

log = logging.getLogger(__name__)

INSTRUCTION_BYTES = 16  # the longest x86 instruction is 15 bytes (SDM Vol. 2 §2.3.11)
STACK_WORDS = 256  # how far up the stack return addresses are looked for
PAGE_SIZE = 4096
DEFAULT_EXIT_HISTORY = POST_MORTEM_EXIT_HISTORY
# SDM Vol. 3 §2.5 (CR0.PE), §2.2.1 (IA32_EFER.LMA); the CS descriptor's L and D bits (§3.4.5).
CR0_PE = 1 << 0
EFER_LMA = 1 << 10


class VcpuLike(Protocol):
    id: int

    def get_regs(self) -> dict[str, int]: ...

    def get_sregs(self) -> SystemRegisters: ...

    def translate(self, linear_address: int) -> int | None: ...


class MemoryLike(Protocol):
    def read(self, gpa: int, size: int) -> bytes: ...


class StackEntry(TypedDict):
    """A word on the stack that points into kernel text: a candidate return address."""

    address: int  # where on the stack (linear)
    value: int
    symbol: str  # "func+0x1c/0x80"


@dataclass
class VcpuPostMortem:
    index: int
    regs: dict[str, int] = field(default_factory=dict)
    sregs: dict[str, int] = field(default_factory=dict)
    mode: str = ""  # "real", "protected" (32-bit), "compat", "long"
    code: bytes = b""  # the bytes at RIP (fewer when the page after it is unmapped)
    code_error: str = ""
    disassembly: list[str] = field(default_factory=list)
    rip_symbol: str = ""
    stack: list[StackEntry] = field(default_factory=list)
    error: str = ""

    def to_dict(self) -> dict[str, object]:
        result: dict[str, object] = {"vcpu": self.index}
        if self.error:
            result["error"] = self.error
            return result
        result.update(mode=self.mode, regs=self.regs, sregs=self.sregs, code=self.code.hex(' '),
                      disassembly=self.disassembly)  # fmt: skip
        if self.code_error:
            result["code_error"] = self.code_error
        if self.rip_symbol:
            result["rip_symbol"] = self.rip_symbol
        if self.stack:
            result["stack_return_addresses"] = self.stack
        return result


@dataclass
class PostMortem:
    outcome: Outcome
    vcpus: list[VcpuPostMortem]
    exits: list[ExitRecord]
    exit_history_kept: bool
    console_tail: bytes
    symbols: str = ""  # where symbols came from, if any

    def to_dict(self) -> dict[str, object]:
        return {
            "outcome": self.outcome.kind.value,
            "detail": self.outcome.detail,
            "vcpus": [vcpu.to_dict() for vcpu in self.vcpus],
            "last_exits": self.exits if self.exit_history_kept else None,
            "console_tail": self.console_tail.decode("utf-8", errors="replace"),
            "symbols": self.symbols or None,
        }


def cpu_mode(sregs: dict[str, int]) -> str:
    if not sregs.get("cr0", 0) & CR0_PE:
        return "real"
    if sregs.get("efer", 0) & EFER_LMA:
        return "long" if sregs.get("cs_l") else "compat"
    return "protected"


def summarize_sregs(sregs: SystemRegisters) -> dict[str, int]:
    """cr0, cr2, cr3, cr4, efer and cs of the special registers."""
    cs = sregs.cs
    return {
        "cr0": sregs.cr0, "cr2": sregs.cr2, "cr3": sregs.cr3, "cr4": sregs.cr4, "efer": sregs.efer,
        "cs": cs.selector, "cs_base": cs.base, "cs_l": cs.l, "cs_db": cs.db, "cpl": cs.selector & 3,
    }  # fmt: skip


def read_linear(vcpu: VcpuLike, memory: MemoryLike, address: int, size: int) -> tuple[bytes, str]:
    """Up to `size` bytes at a linear address through the vCPU's page tables (KVM_TRANSLATE),
    page by page; stops at the first page that is not mapped and says why."""
    chunks: list[bytes] = []
    while size > 0:
        part = min(size, PAGE_SIZE - address % PAGE_SIZE)
        try:
            physical = vcpu.translate(address)
        except HypervisorError as error:
            return b"".join(chunks), f"cannot translate {address:#x}: {error}"
        if physical is None:
            return b"".join(chunks), f"{address:#x} is not mapped by the guest's page tables"
        try:
            chunks.append(memory.read(physical, part))
        except HypervisorError as error:
            return b"".join(chunks), f"{address:#x} (physical {physical:#x}) is not guest RAM: {error}"
        address, size = address + part, size - part
    return b"".join(chunks), ""


def code_bits(sregs: dict[str, int]) -> int:
    """The default operand size of the code at RIP: 64 with CS.L in long mode, else CS.D picks 32
    or 16 (SDM Vol. 3 §3.4.5: a protected-mode guest may still run a 16-bit code segment)."""
    mode = cpu_mode(sregs)
    if mode == "real":
        return 16
    if mode == "long":
        return 64
    return 32 if sregs.get("cs_db") else 16


_CAPSTONE_MODES = {16: "CS_MODE_16", 32: "CS_MODE_32", 64: "CS_MODE_64"}


def disassemble(code: bytes, address: int, bits: int, limit: int = 4) -> list[str]:
    """The first instructions of `code`: capstone (the optional extra `pyhv[disasm]`) when it is
    installed, else pyhv's own instruction names (hypervisor.vcpu.insn_names) for the first one,
    else nothing (the bytes are shown anyway)."""
    if not code:
        return []
    try:
        import capstone
    except ImportError:
        capstone = None
    if capstone is not None:
        engine = capstone.Cs(capstone.CS_ARCH_X86, getattr(capstone, _CAPSTONE_MODES.get(bits, "CS_MODE_64")))
        lines = []
        for instruction in engine.disasm(code, address):
            lines.append(f"{instruction.address:#x}: {instruction.mnemonic} {instruction.op_str}".rstrip())
            if len(lines) == limit:
                break
        if lines:
            return lines
    try:
        from hypervisor.vcpu import insn_names  # written by the emulator's helper; may be absent
    except ImportError:
        return []
    describe = getattr(insn_names, "describe_instruction", None)
    return [f"{address:#x}: {describe(code, code_bits=bits)}"] if callable(describe) else []


def stack_return_addresses(
    vcpu: VcpuLike, memory: MemoryLike, rsp: int, word: int, symbols: SymbolTable, limit: int = 16
) -> list[StackEntry]:
    """Words on the stack from RSP up that point into a text symbol: candidate return addresses
    (the kernel's own oops "Call Trace" finds them the same way without frame pointers)."""
    data, _ = read_linear(vcpu, memory, rsp, STACK_WORDS * word)
    found: list[StackEntry] = []
    for position in range(0, len(data) - word + 1, word):
        value = int.from_bytes(data[position : position + word], "little")
        if value and symbols.is_text(value):
            found.append({"address": rsp + position, "value": value, "symbol": symbols.format(value)})
            if len(found) == limit:
                break
    return found


def collect_vcpu(vcpu: VcpuLike, memory: MemoryLike | None, symbols: SymbolTable | None) -> VcpuPostMortem:
    result = VcpuPostMortem(vcpu.id)
    try:
        result.regs = vcpu.get_regs()
        result.sregs = summarize_sregs(vcpu.get_sregs())
    except HypervisorError as error:
        result.error = f"registers unavailable: {error}"
        return result
    result.mode = cpu_mode(result.sregs)
    rip = result.regs["rip"]
    # Outside long mode the linear address adds the CS base (SDM Vol. 3 §3.4.2, real mode §20.1.1).
    linear = rip if result.mode == "long" else (result.sregs["cs_base"] + rip) & 0xFFFF_FFFF
    if memory is not None:
        result.code, result.code_error = read_linear(vcpu, memory, linear, INSTRUCTION_BYTES)
        result.disassembly = disassemble(result.code, linear, code_bits(result.sregs))
    if symbols is not None:
        result.rip_symbol = symbols.format(linear)
        if memory is not None:
            word = 8 if result.mode == "long" else 4
            rsp = result.regs["rsp"] if result.mode == "long" else result.regs["rsp"] & 0xFFFF_FFFF
            result.stack = stack_return_addresses(vcpu, memory, rsp, word, symbols)
    return result


def console_tail(observer: ConsoleObserver) -> bytes:
    """The last console bytes the machine's ConsoleObserver kept (TAIL_BYTES)."""
    return observer.tail()


def exit_records(history: Iterable[ExitEvent] | None) -> list[ExitRecord]:
    """The kept exits as trace objects (without times: the history keeps none)."""
    records = []
    for event in history or ():
        record = exit_record(event, 0.0)
        del record["t"]
        records.append(record)
    return records


def collect(machine: Any, outcome: Outcome, symbols: SymbolTable | None = None) -> PostMortem:
    """The post-mortem of a machine whose vCPU threads have stopped (call before close())."""
    stuck = machine.stuck_vcpu_threads()
    vcpus = []
    for vcpu in machine.vcpus:
        if f"vcpu{vcpu.id}" in stuck:  # still inside KVM_RUN: its registers are not final
            vcpus.append(VcpuPostMortem(vcpu.id, error="the vCPU thread did not stop; registers not read"))
            continue
        vcpus.append(collect_vcpu(vcpu, machine.memory, symbols))
    history = machine.exit_history
    return PostMortem(outcome, vcpus, exit_records(history), history is not None, console_tail(machine.observer),
                      symbols.source if symbols is not None else "")  # fmt: skip
