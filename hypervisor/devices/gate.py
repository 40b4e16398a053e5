"""One lock per device, held by the bus, and the device's side effects after it is released.

DESIGN.md "One lock at the bus", after Firecracker's devices/bus.rs (the bus keeps every device
behind one mutex): a device is a state machine with no lock of its own. When `Bus.insert` puts
a `GatedDevice` on a bus it gives it a `DeviceGate`, and every way into the device -- a vCPU's
exit (the C loop's Python dispatch calls the device's `read`/`write`), the console thread typing
into the UART, a virtio I/O thread completing requests, a snapshot taking or setting the
device's state -- runs the device's code under that gate's one lock.

What a device does to the world outside it (console bytes, interrupt line changes, a stop
request, a kick of its I/O thread) is not done under the lock: the device posts each such
effect (`GatedDevice._post`) while it runs, and the gate performs the effects after it released
the lock, in the order they were posted. So an effect may block (a stdout that does not drain)
or call back into its device (a console that types into the UART) without stalling or
deadlocking the other threads that use the device: they take the lock, run, queue their own
effects and go. Effects of all threads stay in one order: while one thread performs effects
(the drainer), effects posted by others wait in the gate's queue and the drainer performs them
too. A bus access (`_access`, a vCPU) returns only once its own effects are done, so the guest
never runs ahead of them (a byte it wrote is on the console before its debug-exit write ends
the run); a host-side call (`_serialised`) does not wait for effects another thread performs.

A device that is on no bus (a unit test, a tool) has no gate: its calls run directly and its
effects are performed at the end of each call, in order, on the calling thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

Effect = Callable[..., object]
Posted = tuple[Effect, tuple[Any, ...]]  # an effect and its arguments
T = TypeVar("T")


class DeviceGate:
    """The lock of one device state machine and the queue of effects performed after it."""

    __slots__ = ("name", "_lock", "_done", "_pending", "_drainer", "_posted", "_performed", "_waiting")

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)  # effects performed (for waiting accesses)
        self._pending: list[Posted] = []
        self._drainer: int | None = None  # the thread performing effects now
        self._posted = 0
        self._performed = 0
        self._waiting = 0

    def locked(self) -> bool:
        """Whether some thread is inside the device now (tests: effects run outside)."""
        return self._lock.locked()

    def run(self, device: GatedDevice, function: Callable[..., T], args: tuple[Any, ...], wait: bool) -> T:
        """`function(*args)` under the lock, then the effects it posted on `device`. With
        `wait`, returns only once those effects were performed (by this thread or another)."""
        with self._lock:
            try:
                result = function(*args)
            except BaseException as error:
                batch = self._claim(device, wait=False)
                failure: BaseException | None = error  # raised after the effects it posted
            else:
                effects = device._outbox
                if not effects:  # most accesses have no effect: nothing more to do
                    return result
                if self._drainer is None and not self._pending:  # the usual case: one thread
                    device._outbox = None
                    self._posted += len(effects)
                    self._drainer = threading.get_ident()
                    batch = effects
                else:
                    batch = self._claim(device, wait)
                failure = None
        if batch is not None:
            if failure is None:
                self._drain(batch)
            else:
                try:
                    self._drain(batch)
                except Exception:
                    log.exception("%s: a device effect failed after the device raised", self.name)
        if failure is not None:
            raise failure
        return result

    def _claim(self, device: GatedDevice, wait: bool) -> list[Posted] | None:
        """With the lock held: queues the device's new effects and returns the batch this
        thread performs now, or None when the drainer (another thread, or this one further up
        its stack) performs them."""
        effects = device._outbox
        if effects:
            device._outbox = None
            self._posted += len(effects)
            self._pending.extend(effects)
        if self._drainer is None:
            if not self._pending:
                return None
            return self._become_drainer()
        if self._drainer == threading.get_ident() or not wait:
            return None
        target = self._posted
        self._waiting += 1
        try:
            while self._performed < target:
                if self._drainer is None:  # the drainer left early (interrupted): take over
                    return self._become_drainer()
                self._done.wait()
        finally:
            self._waiting -= 1
        return None

    def _become_drainer(self) -> list[Posted]:
        self._drainer = threading.get_ident()
        batch, self._pending = self._pending, []
        return batch

    def _drain(self, batch: list[Posted]) -> None:
        """Performs `batch` and whatever other threads queue meanwhile, without the lock."""
        first_error: Exception | None = None
        done = 0
        try:
            while True:
                for done, (effect, args) in enumerate(batch, 1):  # noqa: B007 - read on interrupt
                    try:
                        effect(*args)
                    except Exception as error:  # the rest still happen; the first is raised
                        if first_error is None:
                            first_error = error
                        else:
                            log.exception("%s: a further device effect failed", self.name)
                with self._lock:
                    self._performed += len(batch)
                    done = 0
                    if self._waiting:
                        self._done.notify_all()
                    if not self._pending:
                        self._drainer = None
                        break
                    batch, self._pending = self._pending, []
        except BaseException:
            # KeyboardInterrupt and the like, in the middle of an effect: what is left of the
            # batch goes back to the front of the queue for the next thread.
            with self._lock:
                self._pending[:0] = batch[done:]
                self._performed += done
                self._drainer = None
                self._done.notify_all()
            raise
        if first_error is not None:
            raise first_error


class GatedDevice:
    """Mixin of a device state machine without a lock of its own (see the module docstring).

    The device's entry points call `_access` (bus accesses) or `_serialised` (host side) with
    the function that does the work; that function changes state and posts its effects with
    `_post`, never calling out itself.
    """

    _gate: DeviceGate | None = None
    _outbox: list[Posted] | None = None

    def _post(self, effect: Effect, *args: Any) -> None:
        """Queue `effect(*args)` to be performed after the device's lock is released."""
        if self._outbox is None:
            self._outbox = [(effect, args)]
        else:
            self._outbox.append((effect, args))

    def _access(self, function: Callable[..., T], *args: Any) -> T:
        """A bus access: returns once its effects are performed."""
        gate = self._gate
        if gate is None:
            return self._ungated(function, args)
        return gate.run(self, function, args, True)

    def _serialised(self, function: Callable[..., T], *args: Any) -> T:
        """A host-side call (console input, I/O thread, snapshot): under the same lock; its
        effects are performed in order, by this thread unless another is performing effects."""
        gate = self._gate
        if gate is None:
            return self._ungated(function, args)
        return gate.run(self, function, args, False)

    def _ungated(self, function: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            return function(*args)
        finally:
            while self._outbox:
                effects, self._outbox = self._outbox, None
                for effect, effect_args in effects:
                    effect(*effect_args)

    def gate_owner(self) -> GatedDevice:
        """The state machine this bus device belongs to (itself; i8042's ports say their
        controller, so both ports share one lock)."""
        return self

    @property
    def gate(self) -> DeviceGate | None:
        """The gate the bus gave this device (None while it is on no bus)."""
        return self._gate


def attach_gate(device: object, name: str) -> DeviceGate | None:
    """Gives `device` (a bus device) its gate, or the one its state machine already has (a
    device on two ranges, or a controller behind two ports). None for a device that is not a
    GatedDevice: such a device serialises itself, if it needs to."""
    owner = getattr(device, "gate_owner", None)
    if owner is None:
        return None
    machine = owner()
    if not isinstance(machine, GatedDevice):
        return None
    if machine._gate is None:
        machine._gate = DeviceGate(name)
    return machine._gate


def gate_of(device: object) -> DeviceGate | None:
    """The gate serialising `device` (None when it has none)."""
    owner = getattr(device, "gate_owner", None)
    machine = owner() if owner is not None else None
    return machine._gate if isinstance(machine, GatedDevice) else None
