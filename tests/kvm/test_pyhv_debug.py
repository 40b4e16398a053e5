"""`pyhv debug` end to end on real KVM: scripted (--batch and stdin) and through a pseudo-terminal,
against the long-mode test guest (tests/guests/long_mode.S): stop at the Nth serial write, read
and change a register, change the guest's exit code in memory, continue to the debug-exit and get
the changed outcome as the exit status."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guests.build import GUEST_BASE, MODE_SPIN, with_parameters

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

GREETING = b"hello from long mode\n"
PARAM_EXIT_CODE = GUEST_BASE + 2  # tests/guests/common.S
PROMPT = b"(pyhv) "


def guest_file(guest_binary, tmp_path: Path, **parameters: int) -> Path:
    image = tmp_path / "guest.bin"
    image.write_bytes(with_parameters(guest_binary("long_mode").read_bytes(), **parameters))
    return image


def debug_command(image: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hypervisor", "debug", "--raw", f"{image}@{GUEST_BASE:#x}", *extra]


def test_batch_script_changes_the_outcome(guest_binary, tmp_path: Path) -> None:
    image = guest_file(guest_binary, tmp_path, exit_code=5)
    console = tmp_path / "console.txt"
    script = tmp_path / "commands.txt"
    script.write_text(
        "# stop at the third character of the greeting\n"
        "break io port=0x3f8 write count=3\n"
        "info breakpoints\n"
        "continue\n"
        "info regs rsi\n"
        "# skip three characters of the greeting: rsi points at the next one\n"
        "set reg rsi $rsi+3\n"
        "x/1xb 0x1002\n"
        "set mem 0x1002 42\n"
        "x/v1xb 0x1002\n"
        "info exits 2\n"
        "delete\n"
        "continue\n"
    )
    command = debug_command(image, "--console", f"file:{console}", "--batch", str(script))
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 42, result.stderr
    out = result.stdout
    assert "(pyhv) continue\nstopped: breakpoint 1: vcpu0 io out port=0x3f8 size=1 data=6c (COM1+0x0)\n" in out
    assert "0x1002:\t0x05\n" in out and "0x1002:\t0x2a\n" in out  # before and after, physical and virtual
    rsi = int(out.split("\nrsi", 1)[1].split()[0], 16)
    assert f"rsi = {rsi + 3:#x}\n" in out
    assert "the run ended: debug-exit 42 (exit status 42)" in out
    assert console.read_bytes() == GREETING[:3] + GREETING[6:]  # "hel" then "from long mode\n"
    assert "pyhv: debug-exit 42 (exit status 42)" in result.stderr
    assert "console is in" in result.stderr and GREETING[:3].decode() not in out


def test_commands_on_stdin_and_next(guest_binary, tmp_path: Path) -> None:
    image = guest_file(guest_binary, tmp_path, exit_code=3)
    commands = "next 3\ninfo exits 0\nquit\n"
    command = debug_command(image, "--console", "none")
    result = subprocess.run(command, input=commands, capture_output=True, text=True, timeout=60)
    # quit while the guest still runs: stopped cleanly, the outcome is "quit" (status 0)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = lines.index("(pyhv) next 3")
    assert lines[start + 1 : start + 4] == [
        "vcpu0 io in port=0x3fd size=1 data=60 (COM1+0x5)",  # LSR: THR empty
        "vcpu0 io out port=0x3f8 size=1 data=68 (COM1+0x0)",  # 'h'
        "vcpu0 io in port=0x3fd size=1 data=60 (COM1+0x5)",
    ]
    assert "exits: 3 in all" in result.stdout
    assert "pyhv: quit: quit from the debugger (exit status 0)" in result.stderr


def test_break_options_and_end_of_input(guest_binary, tmp_path: Path) -> None:
    image = guest_file(guest_binary, tmp_path, exit_code=9)
    command = debug_command(image, "--console", "none", "--break", "io port=0x3f8 write data=0x6c")
    result = subprocess.run(command, input="continue\ninfo regs rax\ndelete 1\ncontinue\n", capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 9, result.stderr
    assert result.stdout.startswith("breakpoint 1: io port=0x3f8 write data=0x6c\n")
    assert "stopped: breakpoint 1: vcpu0 io out port=0x3f8 size=1 data=6c" in result.stdout  # the first 'l'
    assert int(result.stdout.split("\nrax", 1)[1].split()[0], 16) & 0xFF == 0x6C  # AL: the byte written
    assert result.stdout.endswith("the run ended: debug-exit 9 (exit status 9)\n")  # then the end of input


def test_set_data_changes_what_the_guest_reads(guest_binary, tmp_path: Path) -> None:
    """LSR answered 0 (transmitter busy) instead of 0x60: the guest polls again before writing."""
    image = guest_file(guest_binary, tmp_path, exit_code=4)
    commands = "break io port=0x3fd read\ncontinue\nset data 0\nnext\ndelete\nnext 2\ncontinue\n"
    result = subprocess.run(debug_command(image, "--console", "none"), input=commands, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 4, result.stderr
    after = result.stdout.split("(pyhv) set data 0\n", 1)[1].splitlines()
    transcript = [line for line in after if not line.startswith("(pyhv) ")]
    assert transcript[:3] == [
        "the read at 0x3fd now returns 00",
        "vcpu0 io in port=0x3fd size=1 data=60 (COM1+0x5)",  # polled again: it read 0 the first time
        "stopped: breakpoint 1: vcpu0 io in port=0x3fd size=1 data=60 (COM1+0x5)",  # `next` met breakpoint 1
    ]
    assert transcript[4] == "vcpu0 io out port=0x3f8 size=1 data=68 (COM1+0x0)"  # then 'h'


@pytest.mark.parametrize(
    ("arguments", "stdin", "message"),
    [
        (["--break", "io port=0x10000"], "", "--break 'io port=0x10000': port 0x10000 is larger than 0xffff"),
        (["--break", "sideways"], "", "unknown word 'sideways'"),
        (["--batch", "/nonexistent/commands"], "", "--batch /nonexistent/commands does not exist"),
        (["--console", "stdio"], "", "the debugger reads stdin"),
        (["--console", "tcp:1"], "", "--console 'tcp:1'"),
        (["--debug-exit-port", "0x10000"], "", "is not a port number"),
        ([], "set reg rax\nquit\n", "<stdin>:1: set reg wants a register and a value"),
        ([], "x/4xb 0x7fffffffff\n", "<stdin>:1:"),
        ([], "continue\ncontinue\n", "<stdin>:2: the run is over"),
    ],
)
def test_bad_input_is_one_line(guest_binary, tmp_path: Path, arguments: list[str], stdin: str, message: str) -> None:
    image = guest_file(guest_binary, tmp_path)
    result = subprocess.run(debug_command(image, "--console", "none", *arguments), input=stdin, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_bad_batch_file_is_refused(guest_binary, tmp_path: Path) -> None:
    image = guest_file(guest_binary, tmp_path)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"next\n\xff\xfe\n")
    result = subprocess.run(debug_command(image, "--batch", str(binary)), capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and "is not UTF-8 text" in result.stderr
    result = subprocess.run(debug_command(image, "--batch", str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 or "not a regular file" in result.stderr  # click refuses a directory itself


def test_timeout_ends_a_spinning_guest(guest_binary, tmp_path: Path) -> None:
    image = guest_file(guest_binary, tmp_path, mode=MODE_SPIN)
    command = debug_command(image, "--console", "none", "--timeout", "2")
    result = subprocess.run(command, input="continue\n", capture_output=True, text=True, timeout=60)
    assert result.returncode == 124, result.stderr
    assert "the run ended: timeout" in result.stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_continue_ends_the_session(guest_binary, tmp_path: Path, signum: int) -> None:
    image = guest_file(guest_binary, tmp_path, mode=MODE_SPIN)
    process = subprocess.Popen(debug_command(image, "--console", "none"), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write("continue\n")
        process.stdin.flush()
        assert process.stdout.readline() == "(pyhv) continue\n"
        time.sleep(0.5)
        process.send_signal(signum)
        # SIGINT (Ctrl-C) pauses; the end of the script (communicate closes stdin) ends the session.
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    if signum == signal.SIGTERM:
        assert process.returncode == 130 and "interrupted: terminated on the host" in stderr
    else:
        assert "paused (Ctrl-C) with vcpu0 at rip" in stdout and process.returncode == 0
    assert "Traceback" not in stderr


class Terminal:
    """A child process on a pseudo-terminal, read with deadlines (never a hang)."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become pyhv debug
            os.execvpe(command[0], command, env)
        self.output = b""

    def expect(self, pattern: bytes, timeout: float = 30.0) -> bytes:
        deadline = time.monotonic() + timeout
        while pattern not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{pattern!r} did not appear; the terminal shows:\n{self.output.decode()}")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the terminal closed before {pattern!r}:\n{self.output.decode()}")
                self.output += chunk
        before, _, after = self.output.partition(pattern)
        self.output = after
        return before

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            try:  # keep draining, so the child never blocks on a full terminal
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.output += os.read(self.fd, 4096)
            except OSError:
                time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError("pyhv debug did not exit")


def test_interactive_session_on_a_terminal(guest_binary, tmp_path: Path) -> None:
    image = guest_file(guest_binary, tmp_path, exit_code=1)
    console = tmp_path / "console.txt"
    env = dict(os.environ, HOME=str(tmp_path), TERM="dumb")
    terminal = Terminal(debug_command(image, "--console", f"file:{console}"), env)
    try:
        terminal.expect(PROMPT)
        terminal.send("break io port=0x3f8 write count=2\n")
        assert b"breakpoint 1: io port=0x3f8 write count=2" in terminal.expect(PROMPT)
        terminal.send("continue\n")
        assert b"stopped: breakpoint 1: vcpu0 io out port=0x3f8 size=1 data=65" in terminal.expect(PROMPT)
        terminal.send("info regs rax\n")
        rax = int(terminal.expect(PROMPT).split(b"\nrax", 1)[1].split()[0], 16)
        assert rax & 0xFF == 0x65  # AL holds the 'e' just written
        terminal.send("set reg rax 0x1234\n")
        terminal.expect(PROMPT)
        terminal.send("info regs rax\n")
        assert b"0x0000000000001234" in terminal.expect(PROMPT)
        terminal.send("set mem 0x1002 77\n")
        assert b"wrote 1 byte at 0x1002" in terminal.expect(PROMPT)
        terminal.send("help x\n")
        assert b"x/<n><f><u> ADDR" in terminal.expect(PROMPT)
        terminal.send("delete\n")
        terminal.expect(PROMPT)
        terminal.send("continue\n")
        assert b"the run ended: debug-exit 77 (exit status 77)" in terminal.expect(PROMPT)
        terminal.send("quit\n")
        assert terminal.wait() == 77
    finally:
        if terminal.pid:
            try:
                os.kill(terminal.pid, signal.SIGKILL)
                os.waitpid(terminal.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    assert console.read_bytes() == GREETING
    history = (tmp_path / ".pyhv_history").read_text()
    assert "break io port=0x3f8 write count=2" in history and "set mem 0x1002 77" in history


def test_ctrl_c_pauses_a_running_guest(guest_binary, tmp_path: Path) -> None:
    image = guest_file(guest_binary, tmp_path, mode=MODE_SPIN)
    env = dict(os.environ, HOME=str(tmp_path), TERM="dumb")
    terminal = Terminal(debug_command(image, "--console", "none"), env)
    try:
        terminal.expect(PROMPT)
        terminal.send("info br\t\n")  # tab completes the topic
        assert b"info breakpoints\r\nno breakpoints" in terminal.expect(PROMPT)
        terminal.send("n\n")
        assert b"vcpu0 io in port=0x3fd" in terminal.expect(PROMPT)
        terminal.send("\n")  # Enter repeats the last command, as in gdb
        assert b"vcpu0 io out port=0x3f8 size=1 data=68" in terminal.expect(PROMPT)
        terminal.send("continue\n")
        terminal.expect(b"continue")
        time.sleep(0.5)  # it spins in `jmp spin`
        terminal.send("\x03")
        assert b"paused (Ctrl-C) with vcpu0 at rip" in terminal.expect(PROMPT)
        terminal.send("disas $rip 1\n")
        listing = terminal.expect(PROMPT)
        assert b"jmp" in listing or b"pip install" in listing  # capstone is optional: hex and a hint without it
        terminal.send("\x04")  # Ctrl-D: quit
        assert terminal.wait() == 0
    finally:
        try:
            os.kill(terminal.pid, signal.SIGKILL)
            os.waitpid(terminal.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


PDB_SCRIPT = """
import sys
from hypervisor.console import MemoryConsole
from hypervisor.debug.pdb_break import pdb_action
from hypervisor.machine import Machine

with Machine(16, console=MemoryConsole()) as machine:
    machine.load_raw_bytes(open(sys.argv[1], "rb").read(), 0x1000)
    hit = machine.break_on("io", port=0x3F8, is_write=True, data=0x68, action=pdb_action)
    result = machine.run(60)
    stops = [stop.reason for stop in machine.control.pending_stops()]
    print("RESULT", result.exit_status, hit.hits, stops)
"""


def test_pdb_at_an_exit_with_event_and_ctx_in_scope(guest_binary, tmp_path: Path) -> None:
    """The Python API's pdb option: pdb in the hypervisor process at the write of 'h', where the
    user reads the event and the registers, changes the exit code and lets the guest go on."""
    image = guest_file(guest_binary, tmp_path, exit_code=1)
    script = tmp_path / "pdb_script.py"
    script.write_text(PDB_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), TERM="dumb")
    terminal = Terminal([sys.executable, str(script), str(image)], env)
    try:
        assert b"pyhv: exit: vcpu0 io out port=0x3f8 size=1 data=68" in terminal.expect(b"(Pdb) ")
        terminal.send("p event.data, ctx.regs()['rax'] & 0xff, type(machine).__name__\n")
        assert b"(b'h', 104, 'Machine')" in terminal.expect(b"(Pdb) ")
        terminal.send(f"ctx.write_physical({PARAM_EXIT_CODE}, bytes([33]))\n")
        terminal.expect(b"(Pdb) ")
        terminal.send("resume = True\n")
        terminal.expect(b"(Pdb) ")
        terminal.send("c\n")
        # resume = True: the action returned False, so the breakpoint did not stop the machine.
        assert b"RESULT 33 1 ['finished']" in terminal.expect(b"]\r\n") + b"]\r\n"
        assert terminal.wait() == 0
    finally:
        try:
            os.kill(terminal.pid, signal.SIGKILL)
            os.waitpid(terminal.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (b"next\n\xff\xfe\n", b"<stdin>:2: not UTF-8 text (byte 0)"),
        (b"a" * 100_000, b"<stdin>:1: a command line longer than 65536 bytes"),
        (b"x/4xb \x1b[2J\n", b"<stdin>:1: cannot read"),
    ],
)
def test_bad_stdin_is_one_line(guest_binary, tmp_path: Path, stdin: bytes, message: bytes) -> None:
    image = guest_file(guest_binary, tmp_path)
    result = subprocess.run(debug_command(image, "--console", "none"), input=stdin, capture_output=True, timeout=60)
    assert result.returncode == 3 and message in result.stderr and b"Traceback" not in result.stderr


def test_the_pdb_word_in_pyhv_debug(guest_binary, tmp_path: Path) -> None:
    image = guest_file(guest_binary, tmp_path)
    env = dict(os.environ, HOME=str(tmp_path), TERM="dumb")
    terminal = Terminal(debug_command(image, "--console", "none"), env)
    try:
        terminal.expect(PROMPT)
        terminal.send("break io port=0x3f8 write pdb\n")
        terminal.expect(PROMPT)
        terminal.send("continue\n")
        assert b"pyhv: exit: vcpu0 io out port=0x3f8 size=1 data=68" in terminal.expect(b"(Pdb) ")
        terminal.send("p event.data\n")
        assert b"b'h'" in terminal.expect(b"(Pdb) ")
        terminal.send("c\n")  # leaves pdb: the breakpoint stops the machine, the prompt comes back
        assert b"stopped: breakpoint 1: vcpu0 io out port=0x3f8 size=1 data=68" in terminal.expect(PROMPT)
        terminal.send("quit\n")
        assert terminal.wait() == 0
    finally:
        try:
            os.kill(terminal.pid, signal.SIGKILL)
            os.waitpid(terminal.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
