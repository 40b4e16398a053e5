"""The 16550A UART state machine against the PC16550D data sheet and Linux's 8250 probe."""

from __future__ import annotations

import threading

import pytest

from hypervisor.devices.bus import Bus, Device
from hypervisor.devices.serial import (
    FIFO_DEPTH,
    IER,
    IIR_FCR,
    LCR,
    LSR,
    MCR,
    MSR,
    RBR_THR,
    SCR,
    Serial16550A,
)

COM1 = 0x3F8


class RecordingLine:
    """An interrupt line that records every level change."""

    def __init__(self) -> None:
        self.levels: list[bool] = []

    def set_level(self, high: bool) -> None:
        self.levels.append(high)

    def pulse(self) -> None:  # pragma: no cover - the UART never pulses
        raise AssertionError("the 8250 drives a level, it never pulses")

    @property
    def level(self) -> bool:
        return bool(self.levels and self.levels[-1])


class Harness:
    def __init__(self, hold_input: bool = False) -> None:
        self.output = bytearray()
        self.line = RecordingLine()
        self.uart = Serial16550A(self.output.extend, self.line, hold_input_until_driver=hold_input)

    def inb(self, offset: int) -> int:
        buffer = bytearray(1)
        self.uart.read(offset, memoryview(buffer))
        return buffer[0]

    def outb(self, offset: int, value: int) -> None:
        self.uart.write(offset, bytes((value,)))


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_is_a_bus_device() -> None:
    uart = Serial16550A()
    assert isinstance(uart, Device)
    bus = Bus("pio", 0x10000)
    bus.insert(uart, COM1, 8, "com1")
    data = bytearray(1)
    assert bus.read(COM1 + LSR, memoryview(data))
    assert data[0] == 0x60


def test_reset_state(h: Harness) -> None:
    assert h.inb(IER) == 0
    assert h.inb(IIR_FCR) == 0x01  # no interrupt, FIFOs off
    assert h.inb(LCR) == 0
    assert h.inb(MCR) == 0
    assert h.inb(LSR) == 0x60  # THRE and TEMT
    assert h.inb(MSR) & 0xF0 == 0xB0  # CTS, DSR, DCD of a ready terminal
    assert h.line.levels == []


def test_transmit_goes_to_output_unbuffered(h: Harness) -> None:
    for byte in b"login: ":
        h.outb(RBR_THR, byte)
    assert bytes(h.output) == b"login: "
    assert h.inb(LSR) & 0x60 == 0x60


def test_scratch_and_lcr_read_back(h: Harness) -> None:
    for value in (0x00, 0x55, 0xAA, 0xFF):
        h.outb(SCR, value)
        assert h.inb(SCR) == value
    h.outb(LCR, 0x1B)  # 8 data bits, even parity, 2 stop bits: stored as written
    assert h.inb(LCR) == 0x1B


def test_ier_keeps_only_low_nibble(h: Harness) -> None:
    h.outb(IER, 0xFF)
    assert h.inb(IER) == 0x0F


def test_mcr_keeps_only_five_bits(h: Harness) -> None:
    h.outb(MCR, 0xFF)
    assert h.inb(MCR) == 0x1F


def test_divisor_latch_shadows_rbr_and_ier(h: Harness) -> None:
    h.outb(IER, 0x05)
    h.outb(LCR, 0x83)
    h.outb(RBR_THR, 0x01)  # DLL: 115200 baud
    h.outb(IER, 0x02)  # DLM
    assert h.inb(RBR_THR) == 0x01
    assert h.inb(IER) == 0x02
    assert h.output == b""  # a DLL write is not a transmission
    h.outb(LCR, 0x03)
    assert h.inb(IER) == 0x05
    h.outb(LCR, 0x83)
    assert (h.inb(IER), h.inb(RBR_THR)) == (0x02, 0x01)


def test_receive_non_fifo_holds_one_byte_then_refills(h: Harness) -> None:
    h.uart.feed(b"ab")
    assert h.inb(LSR) & 0x01
    assert h.inb(RBR_THR) == ord("a")
    assert h.inb(LSR) & 0x01  # 'b' moved in when 'a' was read
    assert h.inb(RBR_THR) == ord("b")
    assert not h.inb(LSR) & 0x01
    assert h.inb(RBR_THR) == ord("b")  # RBR keeps its last character


def test_feed_more_than_fifo_arrives_in_order(h: Harness) -> None:
    h.outb(IIR_FCR, 0x07)
    data = bytes(range(200)) * 3
    h.uart.feed(data)
    received = bytearray()
    while h.inb(LSR) & 0x01:
        received.append(h.inb(RBR_THR))
    assert bytes(received) == data
    assert not h.inb(LSR) & 0x02  # pasted input never overruns


def test_feed_from_another_thread_keeps_order(h: Harness) -> None:
    h.outb(IIR_FCR, 0x01)
    chunks = [bytes([i % 256]) * 7 for i in range(300)]
    expected = b"".join(chunks)

    def producer() -> None:
        for chunk in chunks:
            h.uart.feed(chunk)

    thread = threading.Thread(target=producer)
    thread.start()
    received = bytearray()
    while len(received) < len(expected):
        if h.inb(LSR) & 0x01:
            received.append(h.inb(RBR_THR))
        elif not thread.is_alive() and not h.inb(LSR) & 0x01:
            break
    thread.join()
    assert bytes(received) == expected


def test_fifo_clear_and_disable(h: Harness) -> None:
    h.outb(IIR_FCR, 0x01)
    h.outb(MCR, 0x10)  # loopback so the bytes are the guest's own
    for byte in b"xyz":
        h.outb(RBR_THR, byte)
    assert h.inb(LSR) & 0x01
    h.outb(IIR_FCR, 0x03)  # clear receive FIFO
    assert not h.inb(LSR) & 0x01
    h.outb(RBR_THR, 0x41)
    h.outb(IIR_FCR, 0x00)  # disabling the FIFO clears it too
    assert not h.inb(LSR) & 0x01
    assert h.inb(IIR_FCR) & 0xC0 == 0


def test_fcr_other_bits_ignored_without_enable(h: Harness) -> None:
    h.outb(IIR_FCR, 0xC0)
    assert h.inb(IIR_FCR) == 0x01


def test_loopback_fifo_overrun_sets_oe_and_keeps_fifo(h: Harness) -> None:
    h.outb(IIR_FCR, 0x01)
    h.outb(MCR, 0x10)
    for value in range(20):
        h.outb(RBR_THR, value)
    assert h.output == b""  # loopback never reaches the outside
    lsr = h.inb(LSR)
    assert lsr & 0x03 == 0x03
    assert not h.inb(LSR) & 0x02  # OE is cleared by reading LSR
    got = []
    while h.inb(LSR) & 0x01:
        got.append(h.inb(RBR_THR))
    assert got == list(range(FIFO_DEPTH))


def test_loopback_overrun_without_fifo_keeps_newest(h: Harness) -> None:
    h.outb(MCR, 0x10)
    h.outb(RBR_THR, 1)
    h.outb(RBR_THR, 2)
    assert h.inb(LSR) & 0x03 == 0x03
    assert h.inb(RBR_THR) == 2


def test_loopback_holds_host_input_back(h: Harness) -> None:
    h.outb(MCR, 0x10)
    h.uart.feed(b"q")
    assert not h.inb(LSR) & 0x01
    h.outb(MCR, 0x00)
    assert h.inb(RBR_THR) == ord("q")


def test_loopback_modem_status_and_deltas(h: Harness) -> None:
    h.inb(MSR)  # clear any delta
    h.outb(MCR, 0x10 | 0x0A)  # LOOP | OUT2 | RTS -> DCD | CTS
    msr = h.inb(MSR)
    assert msr & 0xF0 == 0x90
    assert msr & 0x0F == 0x02  # DSR went away (DTR clear): DDSR; CTS and DCD unchanged
    assert h.inb(MSR) & 0x0F == 0  # deltas clear on read
    h.outb(MCR, 0x10 | 0x05)  # DTR | OUT1 -> DSR | RI
    msr = h.inb(MSR)
    assert msr & 0xF0 == 0x60
    assert msr & 0x0F == 0x0B  # DCTS, DDSR, DDCD
    h.outb(MCR, 0x10)  # RI goes 1 -> 0: trailing edge
    assert h.inb(MSR) & 0x0F == 0x02 | 0x04


def test_received_data_interrupt_and_priority(h: Harness) -> None:
    h.outb(MCR, 0x08)  # OUT2: PC interrupt gate
    h.outb(IER, 0x0F)
    # THRE is pending at once (ETBEI rising edge with THR empty).
    assert h.inb(IIR_FCR) == 0x02
    assert h.inb(IIR_FCR) == 0x01  # reading IIR cleared it
    h.uart.feed(b"k")
    assert h.inb(IIR_FCR) == 0x04
    assert h.line.level
    assert h.inb(RBR_THR) == ord("k")
    assert h.inb(IIR_FCR) == 0x01
    assert not h.line.level


def test_receiver_line_status_outranks_data(h: Harness) -> None:
    h.outb(IER, 0x05)
    h.outb(MCR, 0x10)
    h.outb(RBR_THR, 1)
    h.outb(RBR_THR, 2)  # overrun
    assert h.inb(IIR_FCR) == 0x06
    h.inb(LSR)
    assert h.inb(IIR_FCR) == 0x04


def test_modem_status_interrupt_is_lowest_and_cleared_by_msr_read(h: Harness) -> None:
    h.inb(MSR)
    h.outb(IER, 0x08)
    assert h.inb(IIR_FCR) == 0x01
    h.outb(MCR, 0x10 | 0x02)  # loopback changes the lines
    assert h.inb(IIR_FCR) == 0x00
    h.inb(MSR)
    assert h.inb(IIR_FCR) == 0x01


def test_character_timeout_below_trigger_level(h: Harness) -> None:
    h.outb(IIR_FCR, 0x81)  # FIFO on, trigger level 8
    h.outb(IER, 0x01)
    h.uart.feed(b"abc")
    assert h.inb(IIR_FCR) == 0xCC  # FIFO bits | character timeout
    h.uart.feed(b"defgh")
    assert h.inb(IIR_FCR) == 0xC4  # at the trigger level: received data available


def test_thre_interrupt_rules(h: Harness) -> None:
    h.outb(MCR, 0x08)
    assert h.line.levels == []
    h.outb(IER, 0x02)
    assert h.line.levels == [True]
    assert h.inb(IIR_FCR) == 0x02  # read while THRE is the source clears it...
    assert h.line.levels == [True, False]
    assert h.inb(IIR_FCR) == 0x01
    h.outb(RBR_THR, ord("a"))  # ...and a THR write re-arms it once the byte has gone
    assert h.line.level
    assert h.inb(IIR_FCR) == 0x02
    h.outb(IER, 0x02)  # no rising edge: stays quiet
    assert h.inb(IIR_FCR) == 0x01
    h.outb(IER, 0x00)
    h.outb(IER, 0x02)  # rising edge with THR empty: pending again (Linux's THRE test)
    assert h.inb(IIR_FCR) == 0x02


def test_interrupt_line_needs_out2_and_no_loopback(h: Harness) -> None:
    h.outb(IER, 0x02)
    assert h.line.levels == []  # OUT2 clear: the PC's IRQ gate is closed
    h.outb(MCR, 0x08)
    assert h.line.levels == [True]
    h.outb(MCR, 0x18)  # loopback forces OUT2 inactive
    assert h.line.levels == [True, False]
    h.outb(MCR, 0x08)
    assert h.line.levels == [True, False, True]
    h.outb(IER, 0x00)
    assert h.line.levels == [True, False, True, False]


def test_feed_raises_the_line_from_another_thread(h: Harness) -> None:
    h.outb(MCR, 0x08)
    h.outb(IER, 0x01)
    thread = threading.Thread(target=h.uart.feed, args=(b"z",))
    thread.start()
    thread.join()
    assert h.line.levels == [True]


def test_input_held_until_driver_listens() -> None:
    h = Harness(hold_input=True)
    h.uart.feed(b"echo hi\n")
    h.outb(IER, 0x0F)  # autoconfig()'s IER probe: ERBFI but no OUT2, no driver yet
    h.outb(IER, 0x00)
    h.outb(IIR_FCR, 0x07)  # probe and startup flushes...
    h.inb(RBR_THR)
    assert not h.inb(LSR) & 0x01  # ...see nothing and eat nothing
    assert h.uart.pending_input() == 8
    h.outb(MCR, 0x0B)
    h.outb(IER, 0x05)  # serial8250_do_startup(): RLSI | RDI with OUT2 set
    received = bytearray()
    while h.inb(LSR) & 0x01:
        received.append(h.inb(RBR_THR))
    assert bytes(received) == b"echo hi\n"


def test_fifo_clear_returns_host_input_but_drops_loopback_bytes(h: Harness) -> None:
    h.outb(IIR_FCR, 0x01)
    h.uart.feed(b"0123456789abcdefXYZ")  # 16 in the FIFO, 3 waiting
    assert h.inb(RBR_THR) == ord("0")
    h.outb(IIR_FCR, 0x03)  # clear: host bytes go back in order
    assert h.uart.pending_input() == 18
    h.outb(IIR_FCR, 0x00)  # disable FIFO: one byte at a time now
    received = bytearray()
    while h.inb(LSR) & 0x01:
        received.append(h.inb(RBR_THR))
    assert bytes(received) == b"123456789abcdefXYZ"
    h.outb(MCR, 0x10)
    h.outb(RBR_THR, ord("L"))
    h.outb(IIR_FCR, 0x07)
    h.outb(MCR, 0x00)
    assert not h.inb(LSR) & 0x01 and h.uart.pending_input() == 0


def test_wide_access_is_bytewise(h: Harness) -> None:
    buffer = bytearray(2)
    h.uart.write(SCR - 1, b"\x00\x77")  # MSR write ignored, SCR set
    h.uart.read(LSR, memoryview(buffer))
    assert buffer == bytearray((0x60, h.inb(MSR)))
    assert h.inb(SCR) == 0x77


def _linux_autoconfig(h: Harness) -> str:
    """drivers/tty/serial/8250/8250_port.c autoconfig() of Linux 6.1, with the 16550A variant
    checks (autoconfig_16550a() under CONFIG_SERIAL_8250_16550A_VARIANTS) and size_fifo()."""
    inb, outb = h.inb, h.outb
    scratch = inb(IER)
    outb(IER, 0)
    scratch2 = inb(IER) & 0x0F
    outb(IER, 0x0F)
    scratch3 = inb(IER) & 0x0F
    outb(IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "absent (IER test)"
    save_mcr, save_lcr = inb(MCR), inb(LCR)
    outb(MCR, 0x10 | 0x0A)
    status1 = inb(MSR) & 0xF0
    outb(MCR, save_mcr)
    if status1 != 0x90:
        return "absent (loopback test)"
    outb(LCR, 0xBF)
    outb(IIR_FCR, 0)  # EFR, which on a 16550A is the FCR
    outb(LCR, 0)
    outb(IIR_FCR, 0x01)
    kind = {0: "8250", 1: "unknown", 2: "16550", 3: "16550A"}[inb(IIR_FCR) >> 6]
    if kind == "16550A":
        outb(LCR, 0x80)  # EFR check with DLAB: only ST16C650V1 reads 0
        if inb(IIR_FCR) == 0:
            return "16650"
        outb(LCR, 0xBF)
        if inb(IIR_FCR) == 0:
            return "EFR UART"
        outb(LCR, 0)  # National Semiconductor SuperIO check
        status1 = inb(MCR)
        outb(LCR, 0xE0)
        status2 = inb(IIR_FCR)
        if not (status2 ^ status1) & 0x10:
            outb(LCR, 0)
            outb(MCR, status1 ^ 0x10)
            outb(LCR, 0xE0)
            status2 = inb(IIR_FCR)
            outb(LCR, 0)
            outb(MCR, status1)
            if (status2 ^ status1) & 0x10:
                return "NS16550A"
        outb(LCR, 0)  # TI16750 check
        outb(IIR_FCR, 0x21)
        status1 = inb(IIR_FCR) >> 5
        outb(IIR_FCR, 0x01)
        outb(LCR, 0x80)
        outb(IIR_FCR, 0x21)
        status2 = inb(IIR_FCR) >> 5
        outb(IIR_FCR, 0x01)
        outb(LCR, 0)
        if status1 == 6 and status2 == 7:
            return "16750"
        ier = inb(IER)  # XScale UUE check
        outb(IER, ier & ~0x40)
        if not inb(IER) & 0x40:
            outb(IER, ier | 0x40)
            if inb(IER) & 0x40:
                return "XScale"
        outb(IER, ier)
        if _linux_size_fifo(h) == 64:
            return "U6_16550A"
    outb(LCR, save_lcr)
    outb(MCR, save_mcr)
    outb(IIR_FCR, 0x01)
    outb(IIR_FCR, 0x07)
    outb(IIR_FCR, 0)
    inb(RBR_THR)
    outb(IER, 0)
    return kind


def _linux_size_fifo(h: Harness) -> int:
    inb, outb = h.inb, h.outb
    old_lcr = inb(LCR)
    outb(LCR, 0)
    old_fcr = inb(IIR_FCR)
    old_mcr = inb(MCR)
    outb(IIR_FCR, 0x07)
    outb(MCR, 0x10)
    outb(LCR, 0x80)
    old_dl = inb(RBR_THR) | inb(IER) << 8
    outb(RBR_THR, 1)
    outb(IER, 0)
    outb(LCR, 0x03)
    for count in range(256):
        outb(RBR_THR, count)
    count = 0
    while inb(LSR) & 0x01 and count < 256:
        inb(RBR_THR)
        count += 1
    outb(IIR_FCR, old_fcr)
    outb(MCR, old_mcr)
    outb(LCR, 0x80)
    outb(RBR_THR, old_dl & 0xFF)
    outb(IER, old_dl >> 8)
    outb(LCR, old_lcr)
    return count


def test_linux_autoconfig_finds_a_16550a(h: Harness) -> None:
    assert _linux_autoconfig(h) == "16550A"
    assert h.output == b""  # the probe never leaks loopback bytes to the console
    assert _linux_size_fifo(h) == FIFO_DEPTH


def test_input_piped_at_power_on_survives_linux_bring_up() -> None:
    """`echo cmd | pyhv run`: input that arrives before Linux has set the port up reaches the shell."""
    h = Harness(hold_input=True)
    h.uart.feed(b"echo hello from a pipe; exit\n")
    h.outb(MCR, 0x03)  # early_serial_init(): DTR | RTS
    assert _linux_autoconfig(h) == "16550A"
    _linux_startup(h)
    h.outb(IIR_FCR, 0x81)  # serial8250_do_set_termios(): FIFO on, trigger 8
    received = bytearray()
    while h.line.level:  # the interrupt handler: read while data is ready
        assert h.inb(IIR_FCR) & 0x0F in (0x04, 0x0C)
        while h.inb(LSR) & 0x01:
            received.append(h.inb(RBR_THR))
    assert bytes(received) == b"echo hello from a pipe; exit\n"


def _linux_startup(h: Harness) -> None:
    """serial8250_do_startup() of Linux 6.1 for a 16550A on a fixed ISA IRQ."""
    inb, outb = h.inb, h.outb
    outb(IIR_FCR, 0x01)  # serial8250_clear_fifos()
    outb(IIR_FCR, 0x07)
    outb(IIR_FCR, 0)
    for register in (LSR, RBR_THR, IIR_FCR, MSR):
        inb(register)
    outb(IER, 0x02)  # THRE re-assert test
    inb(IIR_FCR)
    outb(IER, 0)
    outb(IER, 0x02)
    inb(IIR_FCR)
    outb(IER, 0)
    outb(LCR, 0x03)
    outb(MCR, 0x0B)  # DTR | RTS | OUT2
    outb(IER, 0x02)  # TX-enable test
    inb(LSR)
    inb(IIR_FCR)
    outb(IER, 0)
    for register in (LSR, RBR_THR, IIR_FCR, MSR):  # "clear the interrupt registers again for luck"
        inb(register)
    outb(IER, 0x05)  # RLSI | RDI


def test_linux_startup_thre_and_txen_tests(h: Harness) -> None:
    """serial8250_do_startup(): the THRE re-assert test and the TX-enable test must both pass."""
    _linux_autoconfig(h)
    h.outb(IER, 0x02)
    iir1 = h.inb(IIR_FCR)
    h.outb(IER, 0)
    h.outb(IER, 0x02)
    iir = h.inb(IIR_FCR)
    h.outb(IER, 0)
    assert not (not iir1 & 0x01 and iir & 0x01), "would set UART_BUG_THRE"
    h.outb(LCR, 0x03)
    h.outb(MCR, 0x0B)  # DTR | RTS | OUT2
    h.outb(IER, 0x02)
    lsr = h.inb(LSR)
    iir = h.inb(IIR_FCR)
    h.outb(IER, 0)
    assert not (lsr & 0x40 and iir & 0x01), "would set UART_BUG_TXEN"
