"""The UART model's side of COM1's C transmit path (hypervisor/devices/serial.py): when it lets
the loop serve THR and LSR, and that the bytes the loop took keep their place in the output."""

from __future__ import annotations

from hypervisor.devices import serial as uart


class FakeLoop:
    """Stands for hypervisor.kvm.uart.UartTransmitBuffer: bytes 'taken by C' are queued here."""

    def __init__(self) -> None:
        self.pending = b""
        self.fast = False
        self.lsr = 0

    def take(self) -> bytes:
        data, self.pending = self.pending, b""
        return data

    def publish(self, fast: bool, line_status: int) -> bytes:
        self.fast, self.lsr = fast, line_status
        return self.take()


def make() -> tuple[uart.Serial16550A, FakeLoop, list[bytes]]:
    output: list[bytes] = []
    device = uart.Serial16550A(on_output=output.append)
    loop = FakeLoop()
    device.attach_fast_path(loop)
    return device, loop, output


def test_fast_only_while_thr_and_lsr_have_no_side_effects() -> None:
    device, loop, _ = make()
    assert loop.fast and loop.lsr == uart.LSR_THR_EMPTY | uart.LSR_TRANSMITTER_EMPTY
    cases = [(uart.IER, uart.IER_ETBEI), (uart.LCR, uart.LCR_DLAB), (uart.MCR, uart.MCR_LOOP)]
    for register, value in cases:
        device.write(register, bytes([value]))
        assert not loop.fast, register
        device.write(register, b"\0")
        assert loop.fast, register
    device.allow_fast_path(False)
    assert not loop.fast
    device.allow_fast_path(True)
    assert loop.fast


def test_input_shows_in_the_published_line_status() -> None:
    device, loop, _ = make()
    device.write(uart.IER, bytes([uart.IER_ERBFI]))
    device.write(uart.MCR, bytes([uart.MCR_OUT2]))  # a driver listens: input is released
    device.feed(b"k")
    assert loop.fast and loop.lsr & uart.LSR_DATA_READY


def test_an_overrun_turns_the_path_off_until_the_lsr_read_clears_it() -> None:
    device, loop, _ = make()
    device.write(uart.MCR, bytes([uart.MCR_LOOP]))
    device.write(uart.RBR_THR, b"a")
    device.write(uart.RBR_THR, b"b")  # no FIFO: the second byte overruns
    device.write(uart.MCR, b"\0")
    assert not loop.fast
    status = bytearray(1)
    device.read(uart.LSR, memoryview(status))
    assert status[0] & uart.LSR_OVERRUN_ERROR and loop.fast


def test_bytes_taken_by_the_loop_come_out_before_the_models_own() -> None:
    device, loop, output = make()
    loop.pending = b"from C "
    device.write(uart.IER, bytes([uart.IER_ETBEI]))  # the model handles THR from here
    device.write(uart.RBR_THR, b"!")
    loop.pending = b"late"
    device.flush_fast_path()
    assert b"".join(output) == b"from C !late"


def test_a_saved_state_includes_what_the_loop_took() -> None:
    device, loop, output = make()
    loop.pending = b"x"
    state = device.state()
    assert output == [b"x"] and state["fields"]["_thr_empty_pending"] is True
    other, other_loop, _ = make()
    other.write(uart.IER, bytes([uart.IER_ETBEI]))
    other.restore_state(state)  # the restored IER (0) publishes the path again
    assert other_loop.fast
