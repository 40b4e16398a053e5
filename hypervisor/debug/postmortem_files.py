"""A post-mortem (hypervisor.debug.postmortem) as text for stderr and as files for
`pyhv run --post-mortem DIR`: report.json, regs.txt, exits.jsonl, console.txt."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from hypervisor.debug.postmortem import PostMortem, VcpuPostMortem
from hypervisor.debug.trace import ExitRecord
from hypervisor.errors import ConfigError

POST_MORTEM_FILES = ("report.json", "regs.txt", "exits.jsonl", "console.txt")
SUMMARY_EXITS = 8  # exits shown on stderr; exits.jsonl has them all
SUMMARY_CONSOLE_LINES = 10
_GPR_ROWS = (("rax", "rbx", "rcx", "rdx"), ("rsi", "rdi", "rsp", "rbp"), ("r8", "r9", "r10", "r11"),
             ("r12", "r13", "r14", "r15"), ("rip", "rflags"))  # fmt: skip
# What an exit line shows after the access, for the kinds that have it.
_DETAIL_KEYS: tuple[Literal["instruction", "suberror", "reason", "exception"], ...] = (
    "instruction", "suberror", "reason", "exception")  # fmt: skip


def check_post_mortem_dir(path: Path) -> Path:
    """Creates DIR (its parent must exist) or accepts an existing writable directory, before the
    guest runs, so a typo is one ConfigError line instead of a lost post-mortem."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--post-mortem {path} exists and is not a directory")
    try:
        path.mkdir(exist_ok=True)
    except FileNotFoundError:
        raise ConfigError(f"--post-mortem {path}: the folder {path.parent} does not exist") from None
    except OSError as error:
        raise ConfigError(f"--post-mortem {path}: cannot create it: {error.strerror}") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--post-mortem {path} is not writable")
    return path


def _register_lines(vcpu: VcpuPostMortem) -> list[str]:
    lines = [f"vcpu{vcpu.index}" + (f" ({vcpu.mode} mode, CPL {vcpu.sregs.get('cpl', 0)})" if vcpu.mode else "")]
    if vcpu.error:
        return [*lines, f"  {vcpu.error}"]
    for row in _GPR_ROWS:
        lines.append("  " + "  ".join(f"{name:>6}={vcpu.regs.get(name, 0):016x}" for name in row))
    s = vcpu.sregs
    lines.append(f"     cr0={s['cr0']:016x}     cr2={s['cr2']:016x}     cr3={s['cr3']:016x}     cr4={s['cr4']:016x}")
    lines.append(f"    efer={s['efer']:016x}      cs={s['cs']:04x} base={s['cs_base']:x} l={s['cs_l']} d={s['cs_db']}")
    where = f" <{vcpu.rip_symbol}>" if vcpu.rip_symbol else ""
    code = vcpu.code.hex(" ") if vcpu.code else "(none)"
    lines.append(f"  code at rip{where}: {code}" + (f"  ({vcpu.code_error})" if vcpu.code_error else ""))
    lines.extend(f"    {line}" for line in vcpu.disassembly)
    if vcpu.stack:
        lines.append("  return addresses on the stack:")
        lines.extend(f"    [{entry['address']:#x}] {entry['value']:#x} {entry['symbol']}" for entry in vcpu.stack)
    return lines


def _exit_line(record: ExitRecord) -> str:
    parts = [f"vcpu{record['vcpu']}", record["kind"]]
    if "port" in record:
        parts.append(f"{record['dir']} port={record['port']:#x}")
    elif "addr" in record:
        parts.append(f"{record['dir']} addr={record['addr']:#x}")
    if "data" in record:
        parts.append(f"data={record['data']}")
    if "meaning" in record:
        parts.append(f"({record['meaning']})")
    for key in _DETAIL_KEYS:
        if key in record:
            parts.append(f"{key}={record[key]}")
    return " ".join(parts)


def format_summary(post_mortem: PostMortem) -> str:
    """The stderr post-mortem: registers and code of every vCPU, the last exits, the console tail."""
    lines = [f"pyhv: post-mortem ({post_mortem.outcome.describe()})"]
    for vcpu in post_mortem.vcpus:
        lines.extend(_register_lines(vcpu))
    if not post_mortem.exit_history_kept:
        lines.append("last exits: not kept (use --post-mortem DIR or --exit-history N)")
    elif post_mortem.exits:
        shown = post_mortem.exits[-SUMMARY_EXITS:]
        lines.append(f"last {len(shown)} of {len(post_mortem.exits)} kept exits:")
        lines.extend(f"  {_exit_line(record)}" for record in shown)
    else:
        lines.append("last exits: none reached Python")
    tail = post_mortem.console_tail.decode("utf-8", errors="replace").splitlines()[-SUMMARY_CONSOLE_LINES:]
    if tail:
        lines.append(f"console (last {len(tail)} lines):")
        lines.extend(f"  | {line}" for line in tail)
    return "\n".join(lines)


def regs_text(post_mortem: PostMortem) -> str:
    lines: list[str] = []
    for vcpu in post_mortem.vcpus:
        lines.extend(_register_lines(vcpu))
        lines.append("")
    return "\n".join(lines)


def write_post_mortem(directory: Path, post_mortem: PostMortem, report: dict[str, object]) -> None:
    """Writes the four files; an OSError becomes one ConfigError line (the run's status stands)."""
    contents = {
        "report.json": json.dumps(report, indent=2) + "\n",
        "regs.txt": regs_text(post_mortem),
        "exits.jsonl": "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in post_mortem.exits),
    }
    try:
        for name, text in contents.items():
            (directory / name).write_text(text)
        (directory / "console.txt").write_bytes(post_mortem.console_tail)
    except OSError as error:
        raise ConfigError(f"cannot write the post-mortem in {directory}: {error.strerror}") from error
