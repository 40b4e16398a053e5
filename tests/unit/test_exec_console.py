"""`pyhv exec`'s console: only the command's output, in any chunking, and the status."""

from __future__ import annotations

import re

import pytest

from hypervisor.cli.exec import COMMAND_STATUS, RESTORED_STATUS, RESTORED_STATUS_ECHO, RUNNING, CommandOutputConsole

BOOT = (b"Linux version 6.1\r\npyhv guest: init started\r\npyhv guest: running command: echo hi\r\n"
        b"hi\r\nsecond line\r\npyhv guest: command exited with status 7\r\npyhv guest: rebooting\r\n")  # fmt: skip
RESTORED = b"echo hi;echo pyhv:$?\r\nhi\r\npyhv:0\r\npyhv:/# "


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_the_command_output_and_status_of_a_boot(chunk: int) -> None:
    shown = bytearray()
    console = CommandOutputConsole(RUNNING, COMMAND_STATUS, shown.extend)
    for index in range(0, len(BOOT), chunk):
        console.write(BOOT[index : index + chunk])
    assert bytes(shown) == b"hi\r\nsecond line\r\n" and console.status == 7


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_the_command_output_of_a_restored_shell(chunk: int) -> None:
    shown = bytearray()
    console = CommandOutputConsole(re.compile(re.escape(RESTORED_STATUS_ECHO) + rb"\r?\n"), RESTORED_STATUS,
                                   shown.extend)  # fmt: skip
    for index in range(0, len(RESTORED), chunk):
        console.write(RESTORED[index : index + chunk])
    assert bytes(shown) == b"hi\r\n" and console.status == 0


def test_no_status_when_the_command_never_ends() -> None:
    shown = bytearray()
    console = CommandOutputConsole(RUNNING, COMMAND_STATUS, shown.extend)
    console.write(b"pyhv guest: running command: sleep 100\r\nworking\r\nKernel panic - not syncing: x\r\n")
    assert console.status is None and b"working" in bytes(shown)


def test_the_console_before_the_command_stays_bounded() -> None:
    console = CommandOutputConsole(RUNNING, COMMAND_STATUS, lambda data: None)
    for _ in range(1000):
        console.write(b"kernel log line that is not the command\r\n" * 10)
    assert len(console._pending) <= 4096 + 420


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_a_status_lookalike_inside_a_line_is_output(chunk: int) -> None:
    shown = bytearray()
    console = CommandOutputConsole(re.compile(re.escape(RESTORED_STATUS_ECHO) + rb"\r?\n"), RESTORED_STATUS,
                                   shown.extend)  # fmt: skip
    typed = b"echo x pyhv:3;echo pyhv:$?\r\n"
    data = typed + b"x pyhv:3\r\npyhv:12 and more\r\npyhv:0\r\npyhv:/# "
    for index in range(0, len(data), chunk):
        console.write(data[index : index + chunk])
    assert bytes(shown) == b"x pyhv:3\r\npyhv:12 and more\r\n" and console.status == 0


def test_a_command_without_output_gives_its_status() -> None:
    shown = bytearray()
    console = CommandOutputConsole(re.compile(re.escape(RESTORED_STATUS_ECHO) + rb"\r?\n"), RESTORED_STATUS,
                                   shown.extend)  # fmt: skip
    console.write(b"false;echo pyhv:$?\r\npyhv:1\r\npyhv:/# ")
    assert bytes(shown) == b"" and console.status == 1
