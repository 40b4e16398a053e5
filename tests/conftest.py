"""Shared test configuration: tests marked `kvm` skip with the reason when /dev/kvm is unusable."""

from __future__ import annotations

import functools
import os
import signal

import pytest

from tests.guests.build import ToolMissing, build_guest

# The pyhv_vm fixture (tests/kvm/test_pytest_plugin.py). Users get it from the pytest11 entry
# point, which is named after the module, so the two never register it twice.
pytest_plugins = ["hypervisor.pytest_plugin"]


def pytest_configure(config: pytest.Config) -> None:
    # A shell without job control starts background jobs with SIGINT ignored (POSIX, Shell
    # Command Language 2.11), Python then leaves it ignored, and an ignored signal stays ignored
    # across fork and exec: the pyhv processes that tests send SIGINT or Ctrl-C to would never
    # see it (`(.ci/run &)` failed four such tests). A handled signal is reset to the default at
    # exec, so with Python's own handler here every child starts as it would from a terminal.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@functools.lru_cache(maxsize=1)
def kvm_unavailable_reason() -> str | None:
    """None when a VM can be created here, else why not (shown as the skip reason)."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible to this user"
    try:
        from hypervisor.kvm import Kvm

        with Kvm() as kvm:
            kvm.create_vm().close()
    except Exception as error:  # any failure means: cannot test with KVM here
        return f"KVM is not usable here: {error}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    for item in items:
        if item.get_closest_marker("kvm") or item.get_closest_marker("slow"):
            reason = reason or kvm_unavailable_reason()
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def guest_binary():
    """Returns the built flat binary of a test guest by name (skips when gcc/ld are missing)."""

    def build(name: str):
        try:
            return build_guest(name)
        except ToolMissing as error:
            pytest.skip(str(error))

    return build
