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
