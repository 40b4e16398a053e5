"""What a kvm-unit-tests configuration's QEMU options mean for a pyhv run.

unittests.cfg gives each test QEMU command-line options (`qemu_params`, formerly `extra_params`).
pyhv honours those that have a pyhv equivalent (`-m`, `-smp`, `-append`) and says what it leaves
out: a CPU model (`-cpu`: a pyhv guest sees the CPUID this host's KVM supports) and machine
properties. A QEMU `-device` that pyhv has (`edu`, `intel-iommu`: PCI_DEVICE_TYPES) becomes pyhv's
`--device`, with its QEMU properties noted; any other makes the test a SKIP, since the test
needs it.

Backticks are shell in upstream's runner (it `eval`s the line). pyhv runs no shell for a
configuration file: the one command upstream uses, `date +%s`, is answered with the time, and
any other backtick makes the test a SKIP.
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass, field

from hypervisor.devices import PCI_DEVICE_TYPES

QEMU_DEFAULT_MEMORY_MIB = 128  # QEMU's -m default, which the suite is written against
BACKTICK = re.compile(r"`([^`]*)`")
SIZE = re.compile(r"(\d+)([kKmMgGtT]?)[bB]?")
SIZE_UNITS_MIB = {"": 1, "m": 1, "g": 1024, "t": 1024 * 1024}


@dataclass
class PyhvPlan:
    """The pyhv equivalent of a test's options, or why there is none."""

    cpus: int
    memory_mib: int = QEMU_DEFAULT_MEMORY_MIB
    test_args: str = ""
    devices: list[str] = field(default_factory=list)  # `--device` names
    notes: list[str] = field(default_factory=list)  # options pyhv leaves out, for the report
    unsupported: str | None = None  # set: the test cannot run under pyhv, and why


def expand_backticks(text: str, now: float | None = None) -> tuple[str, str | None]:
    """`text` with `date +%s` replaced by the time; the error when another command is asked."""
    error: str | None = None

    def replace(match: re.Match[str]) -> str:
        nonlocal error
        if match.group(1).split() == ["date", "+%s"]:
            return str(int(time.time() if now is None else now))
        error = f"the configuration runs a shell command (`{match.group(1)}`), which pyhv does not run"
        return ""

    return BACKTICK.sub(replace, text), error


def _memory_mib(value: str) -> int | None:
    match = SIZE.fullmatch(value.split(",")[0].removeprefix("size="))
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2).lower()
    if unit == "k":
        return max(1, number // 1024)
    return number * SIZE_UNITS_MIB[unit]


def plan_for(params: str, smp: int, test_args: str, now: float | None = None) -> PyhvPlan:
    plan = PyhvPlan(cpus=smp)
    args, error = expand_backticks(test_args, now)
    params, params_error = expand_backticks(params, now)
    plan.test_args = args
    if error or params_error:
        plan.unsupported = error or params_error
        return plan
    try:
        tokens = shlex.split(params)
    except ValueError as parse_error:
        plan.unsupported = f"cannot parse the QEMU options {params!r}: {parse_error}"
        return plan
    index = 0
    while index < len(tokens):
        option = tokens[index]
        value = tokens[index + 1] if index + 1 < len(tokens) else ""
        index += 2
        if option == "-m":
            memory = _memory_mib(value)
            if memory is None:
                plan.unsupported = f"-m {value!r} is not a memory size"
                return plan
            plan.memory_mib = memory
        elif option == "-smp":
            try:
                plan.cpus = int(value.split(",")[0].removeprefix("cpus="))
            except ValueError:
                plan.unsupported = f"-smp {value!r} is not a CPU count"
                return plan
        elif option == "-append":
            plan.test_args = " ".join(part for part in (plan.test_args, value) if part)
        elif option == "-cpu":
            plan.notes.append(f"-cpu {value} not applied (pyhv offers the CPUID this host's KVM supports)")
        elif option == "-device":
            name, _, properties = value.partition(",")
            if name not in PCI_DEVICE_TYPES:
                plan.unsupported = f"needs QEMU's -device {name}, which pyhv does not have"
                return plan
            plan.devices.append(name)
            # pyhv's intel-iommu always remaps interrupts in xAPIC format, which is QEMU's
            # intremap=on,eim=off: the properties are noted, not applied.
            if properties:
                plan.notes.append(f"-device {name} properties {properties} not applied")
        elif option in ("-machine", "-M", "-global", "-overcommit"):
            plan.notes.append(f"{option} {value} not applied")
        else:
            plan.notes.append(f"{option} not applied")
            index -= 1 if value.startswith("-") or not value else 0
    return plan
