"""The I/O thread of a virtio device: eventfd wake-ups, polling before sleep, prompt stop."""

from __future__ import annotations

import os
import threading
import time

from hypervisor.virtio.worker import QueueWorker


def test_kick_calls_the_handler_for_that_queue():
    seen: list[int] = []
    done = threading.Event()

    def handler(index: int) -> None:
        seen.append(index)
        done.set()

    worker = QueueWorker("test", 2, handler)
    worker.start()
    try:
        worker.kick(1)
        assert done.wait(5)
        assert seen == [1]
    finally:
        worker.close()


def test_external_eventfd_write_wakes_the_thread():
    done = threading.Event()
    worker = QueueWorker("test", 1, lambda index: done.set())
    worker.start()
    try:
        os.eventfd_write(worker.eventfd(0), 1)  # what KVM does for a registered ioeventfd
        assert done.wait(5)
    finally:
        worker.close()


def test_polling_picks_up_work_without_a_notify():
    pending = threading.Event()
    handled: list[float] = []
    first = threading.Event()
    second = threading.Event()

    def handler(index: int) -> None:
        pending.clear()
        handled.append(time.monotonic())
        (second if first.is_set() else first).set()

    worker = QueueWorker("test", 1, handler, has_work=lambda index: pending.is_set(), poll_seconds=5.0)
    worker.start()
    try:
        worker.kick(0)
        assert first.wait(5)
        pending.set()  # new work while the thread polls: no kick needed
        assert second.wait(5)
        assert len(handled) == 2
    finally:
        worker.close()


def test_handler_exception_does_not_kill_the_thread(caplog):
    calls: list[int] = []
    done = threading.Event()

    def handler(index: int) -> None:
        calls.append(index)
        if len(calls) == 1:
            raise RuntimeError("device bug")
        done.set()

    worker = QueueWorker("test", 1, handler)
    worker.start()
    try:
        worker.kick(0)
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        worker.kick(0)
        assert done.wait(5)
        assert "device bug" in caplog.text
    finally:
        worker.close()


def test_stop_is_prompt_while_idle_and_close_is_idempotent():
    worker = QueueWorker("test", 1, lambda index: None)
    worker.start()
    started = time.monotonic()
    worker.stop()
    assert time.monotonic() - started < 1
    assert not worker.running
    worker.close()
    worker.close()
    worker.kick(0)  # closed: ignored


def test_polling_turns_notifications_off_and_on_and_loses_no_buffer():
    """While it polls the thread asks for no notifications; before it sleeps it asks again, and
    a buffer that came in between (reported by turning them on) is handled, not left waiting."""
    calls: list[tuple[int, bool]] = []
    arrive_when_reenabled = [True]
    handled = threading.Event()
    count = [0]

    def set_notifications(index: int, enabled: bool) -> bool:
        calls.append((index, enabled))
        if enabled and arrive_when_reenabled[0]:
            arrive_when_reenabled[0] = False
            return True  # a buffer added while the driver was not notifying
        return False

    def handler(index: int) -> None:
        count[0] += 1
        if count[0] == 2:
            handled.set()

    worker = QueueWorker("test", 1, handler, has_work=lambda index: False, poll_seconds=0.01,
                         set_notifications=set_notifications)  # fmt: skip
    worker.start()
    try:
        worker.kick(0)
        assert handled.wait(5)  # the kick, then the buffer found when turning notifications on
        deadline = time.monotonic() + 5
        while calls[-1:] != [(0, True)] and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        worker.close()
    assert calls[0] == (0, False)
    assert calls[-1] == (0, True)  # the thread sleeps with notifications on
    assert (0, False) in calls[calls.index((0, True)) :]  # off again while it handled that one


def test_stopping_while_polling_leaves_notifications_on():
    state = {"enabled": True}
    polling = threading.Event()

    def set_notifications(index: int, enabled: bool) -> bool:
        state["enabled"] = enabled
        if not enabled:
            polling.set()
        return False

    worker = QueueWorker("test", 1, lambda index: None, has_work=lambda index: False, poll_seconds=60.0,
                         set_notifications=set_notifications)  # fmt: skip
    worker.start()
    try:
        worker.kick(0)
        assert polling.wait(5)
        assert worker.stop()  # ends the 60 s poll at once
        assert state["enabled"] is True  # a snapshot taken now must not tell the driver to stay quiet
    finally:
        worker.close()


def test_buffers_left_when_stopping_mid_poll_are_taken_after_the_next_start():
    """A buffer the driver added while told not to notify, still there when the thread stops
    (a snapshot's drain), is counted on the eventfd so the restarted thread handles it."""
    waiting = threading.Event()
    polling = threading.Event()
    handled: list[int] = []
    again = threading.Event()

    def set_notifications(index: int, enabled: bool) -> bool:
        if not enabled:
            polling.set()
        return enabled and waiting.is_set()

    def handler(index: int) -> None:
        handled.append(index)
        if waiting.is_set():
            waiting.clear()
            again.set()

    worker = QueueWorker("test", 1, handler, has_work=lambda index: False, poll_seconds=60.0,
                         set_notifications=set_notifications)  # fmt: skip
    worker.start()
    try:
        worker.kick(0)
        assert polling.wait(5)
        waiting.set()  # added silently; has_work is not asked again before the stop
        assert worker.stop()
        assert not again.is_set()
        worker.start()
        assert again.wait(5)  # taken by the restarted thread, without a new notify
    finally:
        worker.close()
