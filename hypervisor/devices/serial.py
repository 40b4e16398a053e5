"""An 8250/16550A UART as a pure state machine (the PC's COM ports).

The register model follows the National Semiconductor PC16550D data sheet ("PC16550D Universal
Asynchronous Receiver/Transmitter with FIFOs", Table II "Summary of Registers" and §8 "Registers").
The device sees only offsets 0-7 of its own range; the machine puts it at 0x3f8 (COM1, IRQ 4).

What is modelled and why:

* Transmission is instantaneous: a byte written to THR goes straight to `on_output`, so THR and
  the transmitter shift register are always empty (LSR.THRE and LSR.TEMT read 1) and the THR-empty
  interrupt is re-armed at once, as QEMU and kvmtool do. The divisor latch and LCR are stored and
  read back but do not pace anything.
* Reception: `feed()` (the console thread) queues host input in a host-side queue and moves into
  the receive FIFO only what fits (16 bytes with FIFOs on, 1 without); each read of RBR pulls the
  next queued byte in. Pasted input therefore waits instead of overrunning. Overrun (LSR.OE) still
  happens where the guest itself causes it: in loopback mode, which is how Linux's `size_fifo()`
  counts the FIFO depth.
* Host input is never lost to the guest's housekeeping. Linux probes and resets the port (FIFO
  clears and RBR reads "for luck" in autoconfig(), serial8250_do_startup() and set_termios) long
  before and just after user space opens the console, and input piped in at power-on
  (`echo cmd | pyhv run`) would be eaten by them. So host input is held back until a driver
  listens -- the first time the guest has both IER.ERBFI and MCR.OUT2 set (the IER probe in
  autoconfig() sets ERBFI with OUT2 clear) -- and host bytes still in the FIFO when the guest
  clears it go back to the front of the host queue; only the guest's own loopback bytes are
  discarded. Guests that poll LSR.DR without ever enabling the receive interrupt construct the
  UART with `hold_input_until_driver=False`.
* There is no character clock, so the data sheet's character-timeout interrupt (IIR 0x0C, §8.6:
  data below the trigger level and no FIFO activity for four character times) is reported as soon
  as the FIFO holds data below the trigger level. A guest cannot tell the difference, and without
  it a guest with trigger level 8 would never learn about a single typed key.
* The modem inputs are those of a connected, ready terminal (CTS, DSR and DCD active, RI idle);
  in loopback they follow MCR as the data sheet's §8.7 describes (RTS->CTS, DTR->DSR, OUT1->RI,
  OUT2->DCD).
* Interrupt output follows the PC wiring: the IRQ line is driven only while MCR.OUT2 is set (the
  board gates the UART's INTR pin with OUT2) and never in loopback, where the data sheet forces the
  OUT pins inactive. Linux's 8250 driver sets OUT2 before it expects interrupts.

The C vCPU loop may serve THR writes and LSR reads itself (`attach_fast_path`,
hypervisor/kvm/uart.py): the model publishes when that is exact -- divisor latch closed, THR-empty
interrupt disabled, no loopback, no error bit that an LSR read would clear -- together with the
LSR value to answer, and collects the bytes the loop buffered before it handles any access of
its own, so the model stays the one source of register semantics and the output keeps its order.

The UART has no lock of its own: `feed()` runs on the console thread while the guest accesses
registers from a vCPU thread, and both run under the one lock the bus gives the device
(hypervisor.devices.gate). Transmitted bytes and interrupt line changes are posted as effects and
happen after that lock is released, in order (a byte before the interrupt it re-arms), so a
console whose output blocks never holds up the console thread's input or another vCPU's register
access, and a console may call `feed()` from its output callback.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any, Protocol

from hypervisor.devices.bus import InterruptLine, NullInterruptLine
from hypervisor.devices.state import StatefulDevice

log = logging.getLogger(__name__)

# Register offsets (PC16550D Table II). With LCR.DLAB set, offsets 0 and 1 are DLL and DLM.
RBR_THR = 0
IER = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
REGISTER_COUNT = 8

# IER bits (§8.5).
IER_ERBFI = 0x01  # received data available (and character timeout)
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status
IER_WRITABLE = 0x0F  # bits 4-7 are always 0 on a 16550A

# IIR values (§8.6, Table IV), highest priority first.
IIR_NO_INTERRUPT = 0x01
IIR_RECEIVER_LINE_STATUS = 0x06
IIR_RECEIVED_DATA = 0x04
IIR_CHARACTER_TIMEOUT = 0x0C
IIR_THR_EMPTY = 0x02
IIR_MODEM_STATUS = 0x00
IIR_FIFOS_ENABLED = 0xC0  # bits 7:6 both set when FCR bit 0 is set: "this is a 16550A"

# FCR bits (§8.4).
FCR_FIFO_ENABLE = 0x01
FCR_CLEAR_RECEIVE = 0x02
FCR_CLEAR_TRANSMIT = 0x04
FCR_DMA_MODE = 0x08
FCR_TRIGGER_MASK = 0xC0
RECEIVE_TRIGGER_LEVELS = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}  # FCR bits 7:6 -> bytes

# LCR bits (§8.1).
LCR_DLAB = 0x80

# MCR bits (§8.7).
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_WRITABLE = 0x1F  # bits 5-7 are always 0 on a 16550A

# LSR bits (§8.3).
LSR_DATA_READY = 0x01
LSR_OVERRUN_ERROR = 0x02
LSR_THR_EMPTY = 0x20
LSR_TRANSMITTER_EMPTY = 0x40

# MSR bits (§8.8): deltas in 3:0, current line states in 7:4.
MSR_DELTA_CTS = 0x01
MSR_DELTA_DSR = 0x02
MSR_TRAILING_EDGE_RI = 0x04
MSR_DELTA_DCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_LINES_OF_A_READY_TERMINAL = MSR_CTS | MSR_DSR | MSR_DCD

FIFO_DEPTH = 16  # PC16550D §1: 16-byte transmit and receive FIFOs
# Host-side input waiting for FIFO space. Beyond this the console is far ahead of a guest that is
# not reading; dropping (with one warning) beats growing without bound.
HOST_QUEUE_LIMIT = 1 << 20
# 1.8432 MHz crystal / (16 * 12) = 9600 baud, what PC firmware leaves behind.
DEFAULT_DIVISOR = 12
HOST_ORIGIN = 0x100  # tag bit on FIFO entries that came from feed(), not loopback


class TransmitFastPath(Protocol):
    """The C loop's transmit buffer (hypervisor.kvm.uart.UartTransmitBuffer)."""

    def take(self) -> bytes: ...

    def publish(self, fast: bool, line_status: int) -> bytes: ...


class Serial16550A(StatefulDevice):
    """A 16550A UART implementing the bus `Device` protocol over eight byte registers."""

    STATE_FIELDS = (
        "_host_queue", "_fifo", "_ier", "_fcr", "_lcr", "_mcr", "_lsr", "_msr", "_scr", "_divisor",
        "_last_received", "_thr_empty_pending", "_line_level", "_input_released", "_dropped_warning_given",
    )  # fmt: skip

    def __init__(
        self,
        on_output: Callable[[bytes], None] | None = None,
        interrupt: InterruptLine | None = None,
        hold_input_until_driver: bool = True,
    ) -> None:
        self._on_output = on_output or (lambda data: None)
        self._interrupt: InterruptLine = interrupt or NullInterruptLine()
        self._host_queue: collections.deque[int] = collections.deque()
        self._dropped_warning_given = False
        # Received characters; host input is tagged with HOST_ORIGIN so a FIFO clear can return it.
        self._fifo: collections.deque[int] = collections.deque()
        self._ier = 0
        self._fcr = 0
        self._lcr = 0
        self._mcr = 0
        self._lsr = LSR_THR_EMPTY | LSR_TRANSMITTER_EMPTY
        self._msr = MSR_LINES_OF_A_READY_TERMINAL
        self._scr = 0
        self._divisor = DEFAULT_DIVISOR
        self._last_received = 0
        self._thr_empty_pending = False
        self._line_level = False
        self._input_released = not hold_input_until_driver
        self._fast_path: TransmitFastPath | None = None
        self._fast_path_allowed = True

    # ----------------------------------------------------------------- host side

    def set_output(self, on_output: Callable[[bytes], None]) -> None:
        self._serialised(setattr, self, "_on_output", on_output)

    def set_interrupt(self, interrupt: InterruptLine) -> None:
        self._serialised(self._set_interrupt, interrupt)

    def _set_interrupt(self, interrupt: InterruptLine) -> None:
        self._interrupt = interrupt
        self._line_level = False
        self._update_interrupt()

    def attach_fast_path(self, fast_path: TransmitFastPath | None) -> None:
        """Lets the C loop take THR writes and LSR reads while that is exact (module docstring)."""
        self._serialised(self._attach_fast_path, fast_path)

    def _attach_fast_path(self, fast_path: TransmitFastPath | None) -> None:
        if self._fast_path is not None:  # the old one stops, and what it took comes out
            self._emit_taken(self._fast_path.publish(False, 0))
        self._fast_path = fast_path
        self._publish_fast_path()

    def allow_fast_path(self, allowed: bool) -> None:
        """The machine turns the C path off while exits are observed (a breakpoint on this
        port must see every write); the bytes it buffered come out first."""
        self._serialised(self._allow_fast_path, allowed)

    def _allow_fast_path(self, allowed: bool) -> None:
        self._fast_path_allowed = allowed
        self._publish_fast_path()  # which sends what the loop took under the old setting

    def flush_fast_path(self, wait: bool = True) -> None:
        """Sends the bytes the C loop buffered: on its newline/full exit (`wait`: the vCPU goes
        on once they are out, as after a THR write here) or from the machine's timer."""
        if self._fast_path is not None:
            (self._access if wait else self._serialised)(self._drain_fast_path)

    def _drain_fast_path(self) -> None:
        if self._fast_path is not None:
            self._emit_taken(self._fast_path.take())

    def _emit_taken(self, data: bytes) -> None:
        if data:
            self._thr_empty_pending = True  # as _transmit leaves it after the last byte
            self._post(self._on_output, data)

    def _publish_fast_path(self) -> None:
        if self._fast_path is None:
            return
        fast = (self._fast_path_allowed and not self._lcr & LCR_DLAB and not self._ier & IER_ETBEI
                and not self._loopback and not self._lsr & LSR_OVERRUN_ERROR)  # fmt: skip
        self._emit_taken(self._fast_path.publish(fast, self._line_status()))

    def _encoded_fields(self) -> dict[str, Any]:
        self._drain_fast_path()  # the buffered bytes are output before the state is taken
        return super()._encoded_fields()

    def _set_fields(self, decoded: dict[str, object]) -> None:
        self._drain_fast_path()
        super()._set_fields(decoded)
        self._publish_fast_path()

    def feed(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes were accepted (thread-safe)."""
        return self._serialised(self._feed, data)

    def _feed(self, data: bytes) -> int:
        room = HOST_QUEUE_LIMIT - len(self._host_queue)
        accepted = data[: max(room, 0)]
        if len(accepted) < len(data) and not self._dropped_warning_given:
            log.warning("serial: guest is not reading its input; dropping %d bytes", len(data) - len(accepted))
            self._dropped_warning_given = True
        self._host_queue.extend(accepted)
        self._refill_from_host()
        self._update_interrupt()
        self._publish_fast_path()  # LSR.DR may have changed
        return len(accepted)

    def pending_input(self) -> int:
        """Bytes fed by the host that the guest has not read yet (FIFO plus host queue)."""
        return self._serialised(self._pending_input)

    def _pending_input(self) -> int:
        return len(self._host_queue) + sum(1 for entry in self._fifo if entry & HOST_ORIGIN)

    @property
    def divisor_latch_enabled(self) -> bool:
        """LCR.DLAB (offsets 0 and 1 are DLL/DLM), for the debugger's view of an access
        (hypervisor.debug.device_meaning); read under the device's lock like any access."""
        return self._serialised(lambda: bool(self._lcr & LCR_DLAB))

    @property
    def interrupt_level(self) -> bool:
        """The level last driven on the interrupt line."""
        return self._line_level

    # ----------------------------------------------------------------- Device protocol

    def read(self, offset: int, data: memoryview) -> None:
        self._access(self._read_registers, offset, data)

    def write(self, offset: int, data: bytes) -> None:
        self._access(self._write_registers, offset, data)

    def _read_registers(self, offset: int, data: memoryview) -> None:
        self._drain_fast_path()  # bytes the C loop took come before anything this access does
        # A wider access on this 8-bit ISA device is a run of byte accesses to consecutive ports.
        for index in range(len(data)):
            data[index] = self._read_register(offset + index)
        self._update_interrupt()
        self._publish_fast_path()

    def _write_registers(self, offset: int, data: bytes) -> None:
        self._drain_fast_path()
        for index, value in enumerate(data):
            self._write_register(offset + index, value)
        self._release_input_once_a_driver_listens()
        self._update_interrupt()
        self._publish_fast_path()

    # ----------------------------------------------------------------- registers

    def _read_register(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR:
            return self._divisor & 0xFF if dlab else self._read_receive_buffer()
        if offset == IER:
            return self._divisor >> 8 if dlab else self._ier
        if offset == IIR_FCR:
            return self._read_interrupt_identification()
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            value = self._line_status()
            self._lsr &= ~LSR_OVERRUN_ERROR  # §8.3: OE is reset when the CPU reads the LSR
            return value
        if offset == MSR:
            value = self._modem_status()
            self._msr &= ~0x0F  # §8.8: the delta bits are reset when the CPU reads the MSR
            return value
        if offset == SCR:
            return self._scr
        log.debug("serial: read of offset %d outside the UART", offset)
        return 0xFF

    def _write_register(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                self._divisor = (self._divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif offset == IER:
            if dlab:
                self._divisor = (self._divisor & 0x00FF) | (value << 8)
            else:
                self._write_interrupt_enable(value)
        elif offset == IIR_FCR:
            self._write_fifo_control(value)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._write_modem_control(value)
        elif offset == LSR:
            # §8.3: the LSR is intended for read only; writes are not supported. Ignore.
            log.debug("serial: write %#x to LSR ignored", value)
        elif offset == MSR:
            log.debug("serial: write %#x to MSR ignored", value)
        elif offset == SCR:
            self._scr = value
        else:
            log.debug("serial: write of offset %d outside the UART", offset)

    @property
    def _fifo_enabled(self) -> bool:
        return bool(self._fcr & FCR_FIFO_ENABLE)

    @property
    def _loopback(self) -> bool:
        return bool(self._mcr & MCR_LOOP)

    @property
    def _receive_capacity(self) -> int:
        return FIFO_DEPTH if self._fifo_enabled else 1

    @property
    def _trigger_level(self) -> int:
        return RECEIVE_TRIGGER_LEVELS[self._fcr & FCR_TRIGGER_MASK] if self._fifo_enabled else 1

    def _read_receive_buffer(self) -> int:
        if self._fifo:
            self._last_received = self._fifo.popleft() & 0xFF
            self._refill_from_host()
        # With nothing received, RBR still holds the last character (non-FIFO behaviour).
        return self._last_received

    def _transmit(self, value: int) -> None:
        # Writing THR clears a pending THR-empty interrupt (§8.6, Table IV); the byte leaves at once
        # so THR is empty again and the interrupt is re-armed.
        self._thr_empty_pending = False
        if self._loopback:
            # §8.7: in loopback the transmitter output is connected to the receiver input.
            self._receive(value)
        else:
            self._post(self._on_output, bytes((value,)))  # after the bus lock is released
        self._thr_empty_pending = True

    def _receive(self, value: int) -> None:
        """One character arriving at the receiver (loopback or host input)."""
        if len(self._fifo) < self._receive_capacity:
            self._fifo.append(value)
            return
        # §8.3 OE: in FIFO mode the character in the shift register is overwritten and lost, the
        # FIFO keeps its contents; without FIFOs the new character overwrites RBR.
        self._lsr |= LSR_OVERRUN_ERROR
        if not self._fifo_enabled:
            self._clear_receive_fifo()
            self._fifo.append(value)

    def _refill_from_host(self) -> None:
        # §8.7: in loopback the serial input is disconnected, so host input waits in the queue.
        if self._loopback or not self._input_released:
            return
        capacity = self._receive_capacity
        while self._host_queue and len(self._fifo) < capacity:
            self._fifo.append(self._host_queue.popleft() | HOST_ORIGIN)

    def _clear_receive_fifo(self) -> None:
        """Empty the receive FIFO; host bytes in it go back to the front of the host queue."""
        returned = [entry & 0xFF for entry in self._fifo if entry & HOST_ORIGIN]
        self._host_queue.extendleft(reversed(returned))
        self._fifo.clear()

    def _release_input_once_a_driver_listens(self) -> None:
        if not self._input_released and self._ier & IER_ERBFI and self._mcr & MCR_OUT2:
            self._input_released = True
            self._refill_from_host()

    def _write_interrupt_enable(self, value: int) -> None:
        previous = self._ier
        self._ier = value & IER_WRITABLE
        # Turning ETBEI on while THR is empty raises the THR-empty interrupt again even if an IIR
        # read had cleared it (QEMU and Bochs do this on the rising edge; Linux's THRE test in
        # serial8250_do_startup() and Windows both rely on it).
        if self._ier & IER_ETBEI and not previous & IER_ETBEI:
            self._thr_empty_pending = True

    def _write_fifo_control(self, value: int) -> None:
        enable = value & FCR_FIFO_ENABLE
        if enable != (self._fcr & FCR_FIFO_ENABLE):
            # §8.4 bit 0: changing the FIFO enable bit clears both FIFOs.
            self._clear_receive_fifo()
        if not enable:
            # §8.4: bit 0 must be 1 when other FCR bits are written or they are not programmed.
            self._fcr = 0
            self._refill_from_host()
            return
        if value & FCR_CLEAR_RECEIVE:
            self._clear_receive_fifo()
        # FCR_CLEAR_TRANSMIT: the transmit FIFO is always empty here; nothing to clear.
        self._fcr = value & (FCR_FIFO_ENABLE | FCR_DMA_MODE | FCR_TRIGGER_MASK)
        self._refill_from_host()

    def _write_modem_control(self, value: int) -> None:
        was_loopback = self._loopback
        old_lines = self._modem_lines()
        self._mcr = value & MCR_WRITABLE
        new_lines = self._modem_lines()
        changed = old_lines ^ new_lines
        # §8.8: DCTS, DDSR, DDCD flag any change of CTS, DSR, DCD; TERI flags RI going 1 -> 0.
        delta = 0
        if changed & MSR_CTS:
            delta |= MSR_DELTA_CTS
        if changed & MSR_DSR:
            delta |= MSR_DELTA_DSR
        if changed & MSR_DCD:
            delta |= MSR_DELTA_DCD
        if old_lines & MSR_RI and not new_lines & MSR_RI:
            delta |= MSR_TRAILING_EDGE_RI
        self._msr = (self._msr & 0x0F) | delta | new_lines
        if was_loopback and not self._loopback:
            self._refill_from_host()

    def _modem_lines(self) -> int:
        """The modem input lines (MSR bits 7:4) as the UART currently sees them."""
        if not self._loopback:
            return MSR_LINES_OF_A_READY_TERMINAL
        lines = 0
        if self._mcr & MCR_RTS:
            lines |= MSR_CTS
        if self._mcr & MCR_DTR:
            lines |= MSR_DSR
        if self._mcr & MCR_OUT1:
            lines |= MSR_RI
        if self._mcr & MCR_OUT2:
            lines |= MSR_DCD
        return lines

    def _modem_status(self) -> int:
        return (self._msr & 0x0F) | self._modem_lines()

    def _line_status(self) -> int:
        value = self._lsr
        if self._fifo:
            value |= LSR_DATA_READY
        return value

    # ----------------------------------------------------------------- interrupts

    def _interrupt_source(self) -> int:
        """The highest-priority pending, enabled interrupt as its IIR code (§8.6, Table IV)."""
        if self._ier & IER_ELSI and self._lsr & LSR_OVERRUN_ERROR:
            return IIR_RECEIVER_LINE_STATUS
        if self._ier & IER_ERBFI and self._fifo:
            if self._fifo_enabled and len(self._fifo) < self._trigger_level:
                return IIR_CHARACTER_TIMEOUT
            return IIR_RECEIVED_DATA
        if self._ier & IER_ETBEI and self._thr_empty_pending:
            return IIR_THR_EMPTY
        if self._ier & IER_EDSSI and self._msr & 0x0F:
            return IIR_MODEM_STATUS
        return IIR_NO_INTERRUPT

    def _read_interrupt_identification(self) -> int:
        source = self._interrupt_source()
        if source == IIR_THR_EMPTY:
            # §8.6 Table IV: reading IIR (if THRE is the source) resets the THR-empty interrupt.
            self._thr_empty_pending = False
        return source | (IIR_FIFOS_ENABLED if self._fifo_enabled else 0)

    def _update_interrupt(self) -> None:
        pending = self._interrupt_source() != IIR_NO_INTERRUPT
        level = pending and bool(self._mcr & MCR_OUT2) and not self._loopback
        if level != self._line_level:
            self._line_level = level
            self._post(self._interrupt.set_level, level)
