"""Fault injection with the virtio-blk test guest (tests/guests/virtio_blk.c, functional mode:
write 8 sectors, flush, read them back). The guest sees virtio-blk status codes and ends with its
own verdict: FAIL_WRITE 0x20, FAIL_FLUSH 0x21, FAIL_READ 0x22 when the request it checks fails."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hypervisor.faults import FaultRule
from hypervisor.pytest_plugin import boot
from tests.guests.build import GUEST_BASE, with_parameters

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

FAIL_WRITE, FAIL_FLUSH, FAIL_READ = 0x20, 0x21, 0x22
MiB = 1 << 20


@pytest.fixture
def guest(guest_binary, tmp_path):
    path = tmp_path / "virtio_blk.bin"
    path.write_bytes(with_parameters(guest_binary("virtio_blk").read_bytes(), mode=0))
    return path


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base.raw"
    path.write_bytes(bytes(MiB))
    return path


def run_with(guest, base, tmp_path, *faults: str | FaultRule, **options: object):
    return boot(raw=(guest, GUEST_BASE), memory_mib=16, disks=[f"{base},snapshot=on"], faults=faults,
                overlay_dir=tmp_path, timeout=60, **options)  # type: ignore[arg-type]  # fmt: skip


def test_the_failed_write_is_an_io_error_status_and_the_run_ends_with_a_verdict(guest, base, tmp_path) -> None:
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "hypervisor", "run", "--console", "none", "--raw", f"{guest}@{GUEST_BASE:#x}",
         "--disk", f"{base},snapshot=on", "--fault", "vda:write:1:eio", "--report", str(report)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == FAIL_WRITE, result.stderr  # the guest saw VIRTIO_BLK_S_IOERR and said so
    data = json.loads(report.read_text())
    assert data["outcome"] == "debug-exit"
    injected = data["faults"]["injected"]
    assert [(f["disk"], f["operation"], f["action"], f["sector"], f["sectors"]) for f in injected] == [
        ("vda", "write", "eio", 3, 8)
    ]
    assert data["disks"]["vda"]["write_set"]["written"] == []  # nothing reached the disk
    assert base.read_bytes() == bytes(MiB)


def test_the_kth_write_counts_from_one(guest, base, tmp_path) -> None:
    # The guest makes one write: a rule for the 2nd never fires, and says so.
    result = run_with(guest, base, tmp_path, "vda:write:2:eio")
    assert result.exit_status == 0
    assert result.faults is not None and result.faults["injected"] == []
    assert result.faults["rules"][0]["matching_requests"] == 1 and result.faults["rules"][0]["injected"] == 0


def test_a_failed_flush(guest, base, tmp_path) -> None:
    result = run_with(guest, base, tmp_path, "vda:flush:1:eio")
    assert result.exit_status == FAIL_FLUSH
    assert result.write_sets["vda"]["written"] == [[3, 8]] and result.write_sets["vda"]["flushes"] == 0
    assert not result.flushed_before_poweroff


def test_a_dropped_flush_is_answered_ok_and_listed(guest, base, tmp_path) -> None:
    result = run_with(guest, base, tmp_path, FaultRule("vda", "flush", action="drop"))
    assert result.exit_status == 0  # the guest believes its data is durable
    assert result.write_sets["vda"]["flushes"] == 0 and result.write_sets["vda"]["unflushed"] == [[3, 8]]
    assert [fault["action"] for fault in result.faults["injected"]] == ["drop"]  # type: ignore[index]


def test_a_short_read_is_an_io_error(guest, base, tmp_path) -> None:
    result = run_with(guest, base, tmp_path, "vda:read:1:short,bytes=2048")
    assert result.exit_status == FAIL_READ


def test_a_slow_write_delays_and_succeeds(guest, base, tmp_path) -> None:
    result = run_with(guest, base, tmp_path, "vda:write:1:slow,delay=0.5")
    assert result.exit_status == 0
    assert result.report["wall_seconds"] >= 0.5
    assert result.write_sets["vda"]["written"] == [[3, 8]]


@pytest.mark.parametrize("trigger", ["exits=1000000000", "time=3600", "after=never printed"])
def test_a_rule_whose_trigger_never_holds_never_fires(guest, base, tmp_path, trigger: str) -> None:
    result = run_with(guest, base, tmp_path, f"vda:write:1:eio,{trigger}")
    assert result.exit_status == 0
    assert result.faults is not None and result.faults["rules"][0]["armed_at_seconds"] is None


def test_an_exit_trigger_that_holds(guest, base, tmp_path) -> None:
    # By the first write the guest has made a few dozen register accesses (virtio-mmio setup).
    result = run_with(guest, base, tmp_path, "vda:write:1:eio,exits=5")
    assert result.exit_status == FAIL_WRITE
    assert result.faults is not None and result.faults["rules"][0]["armed_at_seconds"] is not None


def test_bad_fault_options_are_one_line_errors(guest, base) -> None:
    for arguments, message in [
        (["--fault", "vda:write:1:eio"], "--fault needs a --disk"),
        (["--disk", str(base), "--fault", "vdb:write:1:eio"], "this run has vda"),
        (["--disk", str(base), "--fault", "vda:write:one:eio"], "K must be a whole number"),
    ]:
        result = subprocess.run([sys.executable, "-m", "hypervisor", "run", "--console", "none", "--raw",
                                 f"{guest}@{GUEST_BASE:#x}", *arguments], capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 3 and len(lines) == 1 and message in lines[0], result.stderr
    assert base.read_bytes() == bytes(MiB)


FAIL_BENCH_READ = 0x40


def test_a_time_trigger_met_mid_run_fails_the_next_read(guest_binary, tmp_path) -> None:
    # Benchmark mode: 4 KiB random reads until `count`; the rule arms while they run. (An exit
    # trigger cannot be met mid-run by this guest: after its setup, its queue notifications go to
    # an ioeventfd and it polls the used ring, so it makes no more exits.)
    looping = tmp_path / "bench.bin"
    looping.write_bytes(with_parameters(guest_binary("virtio_blk").read_bytes(), mode=2, port=1, count=1 << 40))
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(4 * MiB))
    result = boot(raw=(looping, GUEST_BASE), disks=[f"{base},snapshot=on"], faults=["vda:read:1:eio,time=0.5"],
                  overlay_dir=tmp_path, timeout=60)  # fmt: skip
    assert result.exit_status == FAIL_BENCH_READ, result.detail  # the guest saw S_IOERR on that read
    assert result.faults is not None
    rule = result.faults["rules"][0]
    assert rule["injected"] == 1 and rule["matching_requests"] == 1  # the first read after arming
    assert rule["armed_at_seconds"] >= 0.5 and result.faults["injected"][0]["at_seconds"] >= 0.5
