"""`pyhv run --trace FILE` against the test guests, then `pyhv trace summarize|plot` on the result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.guests.build import MODE_OUT_COUNT, with_parameters

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

PYHV = [sys.executable, "-m", "hypervisor"]
POST_CODE_PORT = 0x80  # sunk by the C loop: counted, never traced


def run_traced(guest_binary, tmp_path: Path, name: str, *extra: str, **parameters: int) -> tuple[int, list[dict]]:
    image = tmp_path / f"{name}.bin"
    image.write_bytes(with_parameters(guest_binary(name).read_bytes(), **parameters))
    trace = tmp_path / "exits.jsonl"
    command = [*PYHV, "run", "--raw", f"{image}@0x1000", "--console", "none", "--trace", str(trace), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    return result.returncode, [json.loads(line) for line in trace.read_text().splitlines()]


def test_trace_has_device_meaning(guest_binary, tmp_path: Path) -> None:
    status, records = run_traced(guest_binary, tmp_path, "real_mode", exit_code=5)
    assert status == 5
    assert records[0]["type"] == "header" and records[0]["version"] == 1
    exits = [r for r in records if r["type"] == "exit"]
    thr = [r for r in exits if r.get("register") == "THR"]
    assert "".join(bytes.fromhex(r["data"]).decode() for r in thr) == "hello from real mode\n"
    assert thr[0]["meaning"] == "serial THR 'h'" and thr[0]["device"] == "COM1" and thr[0]["dir"] == "out"
    assert all(isinstance(r["rip"], int) and r["host_ns"] >= 0 for r in exits)
    assert any(r.get("meaning") == "serial LSR -> 0x60" for r in exits)  # the guest polls THRE
    assert exits[-1]["meaning"] == "debug-exit status 5"
    assert records[-1]["type"] == "end" and records[-1]["outcome"] == "debug-exit"
    assert records[-1]["traced"] == len(exits)


def test_c_path_exits_are_aggregated(guest_binary, tmp_path: Path) -> None:
    status, records = run_traced(guest_binary, tmp_path, "user_mode", "--trace-no-rip", mode=MODE_OUT_COUNT,
                                 port=POST_CODE_PORT, count=300)  # fmt: skip
    assert status == 0
    exits = [r for r in records if r["type"] == "exit"]
    assert not any(r.get("port") == POST_CODE_PORT for r in exits)
    assert not any("rip" in r for r in exits)
    sinks = [r for r in records if r["type"] == "aggregate" and r["counter"] == "pio_sink"]
    assert [(r["vcpu"], r["count"]) for r in sinks] == [(0, 300)]
    summary = subprocess.run([*PYHV, "trace", "summarize", str(tmp_path / "exits.jsonl"), "--by", "device"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert summary.returncode == 0, summary.stderr
    assert "only counted (C fast path" in summary.stdout
    sink_row = next(line for line in summary.stdout.splitlines() if line.startswith("sink"))
    assert sink_row.split()[1] == "300"


def test_plot_of_a_real_trace(guest_binary, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (the optional extra pyhv[plot]) is not installed")
    status, _ = run_traced(guest_binary, tmp_path, "real_mode")
    assert status == 0
    picture = tmp_path / "exits.png"
    result = subprocess.run([*PYHV, "trace", "plot", str(tmp_path / "exits.jsonl"), "-o", str(picture)],
                            capture_output=True, text=True, timeout=90)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert picture.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("where", ["missing-dir/exits.jsonl", "."])
def test_unwritable_trace_is_refused_before_the_guest_runs(guest_binary, tmp_path: Path, where: str) -> None:
    image = tmp_path / "g.bin"
    image.write_bytes(guest_binary("real_mode").read_bytes())
    result = subprocess.run([*PYHV, "run", "--raw", f"{image}@0x1000", "--console", "none", "--trace",
                             str(tmp_path / where)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr and "debug-exit" not in result.stderr


def test_a_full_disk_stops_the_trace_not_the_guest(guest_binary, tmp_path: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("/dev/full (writes fail with ENOSPC) is not on this host")
    image = tmp_path / "g.bin"
    image.write_bytes(with_parameters(guest_binary("real_mode").read_bytes(), exit_code=7))
    result = subprocess.run([*PYHV, "run", "--raw", f"{image}@0x1000", "--console", "none", "--trace", "/dev/full"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 7
    assert result.stderr.count("No space left on device") == 1 and "Traceback" not in result.stderr
