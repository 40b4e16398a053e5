"""Post-mortems without KVM: fake vCPUs over real guest memory."""

from __future__ import annotations

import json
import sys
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import pytest

from hypervisor.debug.console_observer import ConsoleObserver
from hypervisor.debug.postmortem import collect, collect_vcpu, cpu_mode, read_linear
from hypervisor.debug.postmortem_files import (
    POST_MORTEM_FILES,
    check_post_mortem_dir,
    format_summary,
    write_post_mortem,
)
from hypervisor.debug.symbols import parse_system_map
from hypervisor.errors import ConfigError, KvmError
from hypervisor.kvm.registers import Segment, SystemRegisters
from hypervisor.memory import GuestMemory
from hypervisor.outcome import Outcome, OutcomeKind, is_crash
from hypervisor.vcpu.events import PortIo, Shutdown

MiB = 1 << 20
KERNEL = 0xFFFF_FFFF_8100_0000
PHYSICAL = 0x10_0000  # where the fake page tables put KERNEL
SYSTEM_MAP = f"{KERNEL:016x} T start_kernel\n{KERNEL + 0x100:016x} T do_one_initcall\n{KERNEL + 0x400:016x} T _etext\n"
LONG_MODE = {"cr0": 0x8000_0011, "efer": 0x500, "l": 1, "db": 0}


class FakeVcpu:
    """get_regs/get_sregs/translate as hypervisor.kvm.Vcpu offers them; translate maps the
    kernel window to PHYSICAL and identity-maps the first MiB."""

    def __init__(self, index: int, rip: int, rsp: int, sregs: dict[str, int] | None = None, fail: bool = False) -> None:
        self.id = index
        self.regs = {name: 0 for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9",
                                          "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")}  # fmt: skip
        self.regs.update(rip=rip, rsp=rsp, rflags=2)
        values = {**LONG_MODE, **(sregs or {})}
        self.sregs = SystemRegisters(
            cr0=values["cr0"], cr2=0, cr3=0x9000, cr4=0x20, efer=values["efer"],
            cs=Segment(selector=0x10, base=values.get("base", 0), l=values["l"], db=values["db"]),
        )  # fmt: skip
        self.fail = fail

    def get_regs(self) -> dict[str, int]:
        if self.fail:
            raise KvmError("KVM_GET_REGS", 9)
        return dict(self.regs)

    def get_sregs(self) -> SystemRegisters:
        return self.sregs

    def translate(self, address: int) -> int | None:
        if KERNEL <= address < KERNEL + 2 * MiB:
            return PHYSICAL + address - KERNEL
        return address if address < MiB else None


@pytest.fixture()
def memory():
    guest = GuestMemory([(0, 4 * MiB)])
    yield guest
    guest.close()


def test_code_at_rip_through_the_page_tables(memory: GuestMemory) -> None:
    memory.write(PHYSICAL + 0x10, bytes.fromhex("0f0b") + bytes.fromhex("48c7c001000000"))  # ud2; mov rax, 1
    result = collect_vcpu(FakeVcpu(0, KERNEL + 0x10, 0x8000), memory, None)
    assert result.mode == "long" and result.code[:2] == b"\x0f\x0b" and len(result.code) == 16
    pytest.importorskip("capstone", reason="capstone (the optional extra pyhv[disasm]) decodes the bytes")
    assert result.disassembly[0] == f"{KERNEL + 0x10:#x}: ud2"
    assert result.disassembly[1].endswith("mov rax, 1")


def test_without_capstone_pyhvs_own_names_decode_the_first_instruction(memory: GuestMemory, monkeypatch) -> None:
    pytest.importorskip("hypervisor.vcpu.insn_names", reason="the emulator's instruction names are not in this tree")
    monkeypatch.setitem(sys.modules, "capstone", None)
    memory.write(PHYSICAL + 0x10, bytes.fromhex("0f0b"))
    result = collect_vcpu(FakeVcpu(0, KERNEL + 0x10, 0x8000), memory, None)
    assert result.disassembly == [f"{KERNEL + 0x10:#x}: ud2"]


def test_real_mode_adds_the_cs_base(memory: GuestMemory) -> None:
    memory.write(0x10000 + 0x20, b"\xf4")
    vcpu = FakeVcpu(0, 0x20, 0x100, {"cr0": 0x10, "efer": 0, "l": 0, "base": 0x10000})
    result = collect_vcpu(vcpu, memory, None)
    assert result.mode == "real" and result.code[0] == 0xF4


def test_unmapped_rip_is_said_not_raised(memory: GuestMemory) -> None:
    result = collect_vcpu(FakeVcpu(0, 0x4000_0000, 0x8000), memory, None)
    assert result.code == b"" and "not mapped" in result.code_error


def test_code_stops_at_an_unmapped_page(memory: GuestMemory) -> None:
    data, error = read_linear(FakeVcpu(0, 0, 0), memory, MiB - 4, 16)
    assert len(data) == 4 and "not mapped" in error


def test_return_addresses_on_the_stack(memory: GuestMemory) -> None:
    symbols = parse_system_map(SYSTEM_MAP)
    stack = 0x8000
    words = [0x1234, KERNEL + 0x123, 0xDEAD_BEEF, KERNEL + 0x8, KERNEL + 0x10_0000]  # the last is past _etext
    memory.write(stack, b"".join(word.to_bytes(8, "little") for word in words))
    result = collect_vcpu(FakeVcpu(0, KERNEL + 0x104, stack), memory, symbols)
    assert result.rip_symbol == "do_one_initcall+0x4/0x300"
    assert [(entry["address"], entry["symbol"]) for entry in result.stack] == [
        (stack + 8, "do_one_initcall+0x23/0x300"), (stack + 24, "start_kernel+0x8/0x100")]  # fmt: skip


def test_registers_that_cannot_be_read(memory: GuestMemory) -> None:
    result = collect_vcpu(FakeVcpu(1, 0, 0, fail=True), memory, None)
    assert result.error.startswith("registers unavailable") and result.to_dict() == {"vcpu": 1, "error": result.error}


def test_cpu_modes() -> None:
    assert cpu_mode({"cr0": 0}) == "real"
    assert cpu_mode({"cr0": 1}) == "protected"
    assert cpu_mode({"cr0": 0x80000001, "efer": 0x500, "cs_l": 0}) == "compat"
    assert cpu_mode({"cr0": 0x80000001, "efer": 0x500, "cs_l": 1}) == "long"


def test_crash_outcomes() -> None:
    assert is_crash(Outcome(OutcomeKind.TRIPLE_FAULT)) and is_crash(Outcome(OutcomeKind.TIMEOUT))
    assert not is_crash(Outcome(OutcomeKind.DEBUG_EXIT, code=0)) and not is_crash(Outcome(OutcomeKind.POWER_OFF))


def fake_machine(memory: GuestMemory, history: deque | None) -> SimpleNamespace:
    observer = ConsoleObserver(linux_rules=True)
    observer.feed(b"Linux version 6.1\nKernel panic - not syncing: VFS\n")
    vcpus = [FakeVcpu(0, KERNEL, 0x8000), FakeVcpu(1, KERNEL + 0x100, 0x9000)]
    return SimpleNamespace(vcpus=vcpus, memory=memory, exit_history=history, observer=observer,
                           stuck_vcpu_threads=lambda: [])  # fmt: skip


def test_collect_a_machine_and_write_the_files(memory: GuestMemory, tmp_path: Path) -> None:
    history: deque = deque(maxlen=4)
    for char in b"hello":
        history.append(PortIo(0, 0x3F8, 1, 1, True, bytes([char]), "COM1", 0, 100))
    history.append(Shutdown(0))
    outcome = Outcome(OutcomeKind.PANIC, "guest kernel panic: VFS")
    post_mortem = collect(fake_machine(memory, history), outcome, parse_system_map(SYSTEM_MAP))
    assert [vcpu.index for vcpu in post_mortem.vcpus] == [0, 1]
    assert (
        len(post_mortem.exits) == 4 and post_mortem.exits[-1]["kind"] == "shutdown" and "t" not in post_mortem.exits[0]
    )
    text = format_summary(post_mortem)
    assert "post-mortem (panic: guest kernel panic: VFS)" in text
    assert "vcpu1 (long mode, CPL 0)" in text and "<do_one_initcall+0x0/0x300>" in text
    assert "(serial THR/DLL 0x6c ('l'))" in text and "| Kernel panic - not syncing: VFS" in text
    directory = check_post_mortem_dir(tmp_path / "pm")
    write_post_mortem(directory, post_mortem, {"outcome": "panic", "post_mortem": post_mortem.to_dict()})
    assert sorted(path.name for path in directory.iterdir()) == sorted(POST_MORTEM_FILES)
    report = json.loads((directory / "report.json").read_text())
    assert report["post_mortem"]["vcpus"][1]["rip_symbol"] == "do_one_initcall+0x0/0x300"
    assert [json.loads(line)["kind"] for line in (directory / "exits.jsonl").read_text().splitlines()] == [
        "io", "io", "io", "shutdown"]  # fmt: skip
    assert (directory / "console.txt").read_bytes().endswith(b"VFS\n")
    assert "rip=ffffffff81000000" in (directory / "regs.txt").read_text()


def test_without_history_the_summary_says_how_to_keep_it(memory: GuestMemory) -> None:
    post_mortem = collect(fake_machine(memory, None), Outcome(OutcomeKind.TIMEOUT))
    assert post_mortem.to_dict()["last_exits"] is None
    assert "not kept (use --post-mortem DIR or --exit-history N)" in format_summary(post_mortem)


def test_a_vcpu_thread_that_did_not_stop_is_not_read(memory: GuestMemory) -> None:
    machine = fake_machine(memory, None)
    machine.stuck_vcpu_threads = lambda: ["vcpu1"]
    post_mortem = collect(machine, Outcome(OutcomeKind.TIMEOUT))
    assert post_mortem.vcpus[1].error.startswith("the vCPU thread did not stop")


def test_post_mortem_dir_checks(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        check_post_mortem_dir(tmp_path / "file")
    with pytest.raises(ConfigError, match="does not exist"):
        check_post_mortem_dir(tmp_path / "absent" / "pm")
    assert check_post_mortem_dir(tmp_path / "new").is_dir()
    assert check_post_mortem_dir(tmp_path / "new").is_dir()  # an existing folder is fine
