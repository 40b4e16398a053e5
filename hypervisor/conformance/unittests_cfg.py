"""kvm-unit-tests' unittests.cfg: sections of `key = value` lines, one test configuration each.

The format of upstream's scripts/common.bash `for_each_unittest` (its own header documents the
keys): `[name]` starts a test; `file`, `smp`, `test_args`, `qemu_params` (older trees say
`extra_params`, with `-append '...'` for the test's arguments), `groups`, `arch`, `machine`,
`check`, `accel`, `timeout` and `disabled_if` follow. A parameter value may span lines between
triple quotes. Comments start with `#`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hypervisor.errors import ConfigError

DEFAULT_TIMEOUT_SECONDS = 90.0  # scripts/runtime.bash: "${TIMEOUT:-${11:-90s}}"
MAX_CONFIG_BYTES = 1 << 20  # upstream's file is ~20 KiB; anything this large is not one
SECTION = re.compile(r"^\[([^\]]+)\]\s*$")
KEY_VALUE = re.compile(r"^([A-Za-z_]+)\s*=\s*(.*)$")
TRIPLE_QUOTE = '"""'
PARAMS_KEYS = ("qemu_params", "extra_params")
KNOWN_KEYS = {"file", "smp", "test_args", "groups", "arch", "machine", "check", "accel", "timeout",
              "disabled_if", *PARAMS_KEYS}  # fmt: skip
TIME_SUFFIX = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}  # coreutils timeout's units


@dataclass(frozen=True)
class TestConfig:
    __test__ = False  # a data class, not a pytest test class

    name: str
    file: str
    smp: int = 1
    test_args: str = ""
    params: str = ""  # qemu_params / extra_params, verbatim
    groups: tuple[str, ...] = ()
    arch: str = ""
    machine: str = ""
    check: tuple[str, ...] = ()
    accel: str = ""
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    disabled_if: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False)


def parse_timeout(text: str, where: str) -> float:
    """`90`, `90s`, `2m`, `1.5h` as coreutils timeout reads them, in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not match:
        raise ConfigError(f"{where}: timeout {text!r} is not a duration such as 90 or 90s")
    return float(match.group(1)) * TIME_SUFFIX.get(match.group(2) or "s", 1.0)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _build(name: str, values: dict[str, str], where: str) -> TestConfig:
    if "file" not in values or not values["file"]:
        raise ConfigError(f"{where}: test [{name}] has no file")
    try:
        smp = int(values.get("smp", "1").strip())
    except ValueError as error:
        raise ConfigError(f"{where}: test [{name}] smp {values['smp']!r} is not a number") from error
    if not 1 <= smp <= 255:
        raise ConfigError(f"{where}: test [{name}] asks for {smp} CPUs (1 to 255)")
    params = next((values[key] for key in PARAMS_KEYS if key in values), "")
    timeout = parse_timeout(values["timeout"], f"{where} [{name}]") if "timeout" in values else DEFAULT_TIMEOUT_SECONDS
    return TestConfig(
        name=name,
        file=values["file"].strip(),
        smp=smp,
        test_args=_unquote(values.get("test_args", "")),
        params=params.strip(),
        groups=tuple(values.get("groups", "").split()),
        arch=values.get("arch", "").strip(),
        machine=values.get("machine", "").strip(),
        check=tuple(values.get("check", "").split()),
        accel=values.get("accel", "").strip(),
        timeout=timeout,
        disabled_if=values.get("disabled_if", "").strip(),
        extra={key: value for key, value in values.items() if key not in KNOWN_KEYS},
    )


def parse_unittests_cfg(text: str, where: str = "unittests.cfg") -> list[TestConfig]:
    """Every test configuration of `text`, in file order; ConfigError (one line) when malformed."""
    tests: list[TestConfig] = []
    names: set[str] = set()
    current: str | None = None
    values: dict[str, str] = {}
    lines = iter(enumerate(text.splitlines(), start=1))
    for number, raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        section = SECTION.match(line)
        if section:
            if current is not None:
                tests.append(_build(current, values, where))
            current, values = section.group(1).strip(), {}
            if current in names:
                raise ConfigError(f"{where}:{number}: test [{current}] is defined twice")
            names.add(current)
            continue
        pair = KEY_VALUE.match(line)
        if pair is None:
            raise ConfigError(f"{where}:{number}: expected [name] or key = value, not {line[:60]!r}")
        if current is None:
            raise ConfigError(f"{where}:{number}: {pair.group(1)} = ... before the first [test]")
        key, value = pair.group(1), pair.group(2)
        if value.startswith(TRIPLE_QUOTE):
            parts = [value[len(TRIPLE_QUOTE) :]]
            while TRIPLE_QUOTE not in parts[-1]:
                try:
                    parts.append(next(lines)[1])
                except StopIteration:
                    raise ConfigError(f'{where}:{number}: {key} = """ is never closed') from None
            last = parts[-1]
            parts[-1] = last[: last.index(TRIPLE_QUOTE)]
            # A backslash at the end of a line continues it (upstream's reader does the same).
            value = " ".join(part.rstrip("\\").strip() for part in parts)
        values[key] = value
    if current is not None:
        tests.append(_build(current, values, where))
    return tests


def read_unittests_cfg(path: Path) -> list[TestConfig]:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is {size} bytes, too large for a unittests.cfg")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise ConfigError(f"{path} does not exist") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not a text file") from error
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from error
    return parse_unittests_cfg(text, str(path))
