"""`pyhv trace summarize` and `pyhv trace plot` over traces written by the real tracer."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from hypervisor.cli import main
from hypervisor.debug.trace import JsonTracer
from hypervisor.debug.trace_summary import TraceRecord, format_summary, parse_trace, read_trace, summarize
from hypervisor.devices.serial import Serial16550A
from hypervisor.errors import ConfigError
from hypervisor.kvm.stats import VcpuStats
from hypervisor.machine import RunResult
from hypervisor.outcome import Outcome, OutcomeKind
from hypervisor.vcpu.events import MmioAccess, PortIo, Shutdown
from hypervisor.vcpu.stats import merge_statistics, statistics_dict


class Context:
    def __init__(self, device: object = None) -> None:
        self.device = device

    def regs(self) -> dict[str, int]:
        return {"rip": 0x1000}


def write_trace(path: Path) -> None:
    """Four THR writes (1, 2, 3, 4 µs), one LSR read (10 µs), one MMIO read, a shutdown, and
    the C path's 5 sink writes."""
    stream = io.StringIO()
    clock = iter([float(i) for i in range(100)])
    tracer = JsonTracer(stream, clock=lambda: next(clock))
    uart = Context(Serial16550A())
    for index, char in enumerate(b"pyhv"):
        tracer(PortIo(0, 0x3F8, 1, 1, True, bytes([char]), "COM1", 0, (index + 1) * 1000), uart)  # type: ignore[arg-type]
    tracer(PortIo(0, 0x3FD, 1, 1, False, b"\x60", "COM1", 5, 10_000), Context())  # type: ignore[arg-type]
    tracer(MmioAccess(0, 0xD000_0000, 4, False, b"virt", "vda", 0, 4000), Context())  # type: ignore[arg-type]
    tracer(Shutdown(0, 1000), Context())  # type: ignore[arg-type]
    per_vcpu = [statistics_dict(replace(VcpuStats.zero(), total_exits=12, python_exits=7, pio_sink=5))]
    tracer.finish(RunResult(Outcome(OutcomeKind.TRIPLE_FAULT), 0.5, merge_statistics(per_vcpu, 0, 0), per_vcpu))
    path.write_text(stream.getvalue())


@pytest.fixture()
def trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "exits.jsonl"
    write_trace(path)
    return path


def rows(trace_file: Path, by: str) -> dict[str, object]:
    return {row.key: row for row in summarize(read_trace(trace_file), by).rows}


def test_by_reason_counts_times_and_c_path(trace_file: Path) -> None:
    summary = summarize(read_trace(trace_file), "reason")
    assert summary.samples == 12 and summary.total_ns == 25_000
    table = {row.key: row for row in summary.rows}
    out = table["io out"]
    assert (out.samples, out.min_ns, out.max_ns, out.total_ns) == (4, 1000, 4000, 10_000)
    assert table["io in"].samples == 1 and table["mmio read"].samples == 1 and table["shutdown"].samples == 1
    assert table["io (counted)"].samples == 5 and table["io (counted)"].timed == 0
    assert [row.key for row in summary.rows][0] == "io (counted)"  # sorted by samples


def test_by_device_and_register(trace_file: Path) -> None:
    devices = rows(trace_file, "device")
    assert devices["COM1"].samples == 5 and devices["vda"].samples == 1 and devices["sink"].samples == 5  # type: ignore[attr-defined]
    registers = rows(trace_file, "register")
    assert registers["COM1 THR"].samples == 4 and registers["COM1 LSR"].samples == 1  # type: ignore[attr-defined]
    assert registers["vda MagicValue"].samples == 1 and registers["sink write or read"].samples == 5  # type: ignore[attr-defined]


def test_table_has_perf_kvm_stat_columns(trace_file: Path) -> None:
    text = format_summary(summarize(read_trace(trace_file), "reason"))
    header, *body = text.splitlines()
    for column in ("samples", "samples%", "time%", "min µs", "max µs", "avg µs", "total ms"):
        assert column in header
    io_out = next(line for line in body if line.startswith("io out"))
    assert "33.33%" in io_out and "40.00%" in io_out and "2.50" in io_out  # 4/12, 10/25 µs, avg 2.5 µs
    assert body[-1].startswith("total") and "12" in body[-1]


def test_bad_and_truncated_lines_are_counted(trace_file: Path) -> None:
    text = trace_file.read_text()
    damaged = (
        text + "not json\n[1, 2]\n" + '{"type": "exit", "vcpu": "zero", "kind": "io"}\n' + text.splitlines()[1][:20]
    )
    trace_file.write_text(damaged)
    trace = read_trace(trace_file)
    assert trace.bad_lines == 4
    assert summarize(trace, "reason").samples == 12


@pytest.mark.parametrize("t", ["NaN", "Infinity", "-1", '"soon"', "true"])
def test_impossible_times_are_bad_lines(trace_file: Path, t: str) -> None:
    line = '{"type":"exit","t":' + t + ',"vcpu":0,"kind":"io","host_ns":5}\n'
    trace_file.write_text(trace_file.read_text() + line)
    trace = read_trace(trace_file)
    assert trace.bad_lines == 1
    pytest.importorskip("matplotlib", reason="matplotlib (the optional extra pyhv[plot]) is not installed")
    from hypervisor.debug.trace_plot import exit_series

    assert exit_series(trace)[1]


def test_records_are_read_into_typed_fields(trace_file: Path) -> None:
    records = read_trace(trace_file).records
    first = records[0]
    assert first == TraceRecord(False, 0, "io", 1, first.t, 1000, "out", "COM1", "THR", 0x3F8)
    assert isinstance(first.t, float) and first.t > 0
    assert records[5] == TraceRecord(False, 0, "mmio", 1, records[5].t, 4000, "read", "vda", "MagicValue", 0xD000_0000)
    assert records[-1] == TraceRecord(True, 0, "io", 5, device="sink", register="write or read")


EXIT = {"type": "exit", "t": 0.5, "vcpu": 0, "kind": "io", "port": 0x3F8, "dir": "out", "device": "COM1",
        "register": "THR", "host_ns": 700}  # fmt: skip
AGGREGATE = {"type": "aggregate", "vcpu": 0, "counter": "pio_sink", "kind": "io", "device": "sink",
             "register": "write or read", "count": 3}  # fmt: skip


@pytest.mark.parametrize(
    ("base", "change"),
    [
        (EXIT, {"kind": None}),  # missing
        (EXIT, {"vcpu": None}),
        (EXIT, {"kind": 3}),  # wrong types
        (EXIT, {"vcpu": "0"}),
        (EXIT, {"vcpu": True}),
        (EXIT, {"vcpu": 0.0}),
        (EXIT, {"host_ns": "700"}),
        (EXIT, {"host_ns": 1.5}),
        (EXIT, {"device": 7}),
        (EXIT, {"register": ["THR"]}),
        (EXIT, {"dir": False}),
        (EXIT, {"port": "0x3f8"}),
        (EXIT, {"vcpu": -1}),  # impossible values
        (EXIT, {"host_ns": -700}),
        (EXIT, {"port": -8}),
        (EXIT, {"port": None, "addr": -4096}),
        (AGGREGATE, {"count": None}),
        (AGGREGATE, {"count": -3}),
        (AGGREGATE, {"count": "3"}),
        (AGGREGATE, {"count": True}),
        (AGGREGATE, {"count": 2.5}),
        (AGGREGATE, {"device": {"name": "sink"}}),
    ],
)
def test_records_with_bad_fields_are_bad_lines(
    trace_file: Path, base: dict[str, object], change: dict[str, object]
) -> None:
    record = {key: value for key, value in (base | change).items() if value is not None}
    trace_file.write_text(trace_file.read_text() + json.dumps(record) + "\n")
    trace = read_trace(trace_file)
    assert trace.bad_lines == 1
    assert summarize(trace, "register").samples == 12  # the line adds nothing


def test_optional_fields_may_be_absent_or_null(trace_file: Path) -> None:
    lines = [{"type": "exit", "vcpu": 1, "kind": "hlt"}, EXIT | {"device": None, "register": None},
             AGGREGATE | {"register": None}]  # fmt: skip
    trace_file.write_text(trace_file.read_text() + "".join(json.dumps(line) + "\n" for line in lines))
    trace = read_trace(trace_file)
    assert trace.bad_lines == 0 and trace.records[-3] == TraceRecord(False, 1, "hlt")
    registers = rows(trace_file, "register")
    assert registers["hlt"].samples == 1 and registers["unknown 0x3f8"].samples == 1  # type: ignore[attr-defined]
    assert registers["sink ?"].samples == 3  # type: ignore[attr-defined]


def test_cli_summarize_reports_a_badly_typed_record_in_one_line(trace_file: Path) -> None:
    trace_file.write_text(trace_file.read_text() + json.dumps(AGGREGATE | {"count": -1}) + "\n")
    result = CliRunner().invoke(main, ["trace", "summarize", str(trace_file)])
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if "pyhv: warning" in line] == [
        f"pyhv: warning: {trace_file}: skipped 1 line(s) that are not trace records (truncated or not from pyhv)"
    ]


def test_overlong_lines_are_skipped(tmp_path: Path, trace_file: Path) -> None:
    trace_file.write_text(trace_file.read_text() + "x" * 200_000 + "\n")
    assert read_trace(trace_file).bad_lines == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("hello\nworld\n", "not a pyhv exit trace"),
        ('{"type": "header", "format": "other", "version": 1}\n', "not a pyhv exit trace"),
        ('{"type": "header", "format": "pyhv-exit-trace", "version": 99}\n', "version 99"),
        ("", "not a pyhv exit trace"),
    ],
)
def test_files_that_are_not_traces(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_trace(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_trace(tmp_path / "absent")
    with pytest.raises(ConfigError, match="directory"):
        read_trace(tmp_path)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_device_files_are_refused(device: str) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        read_trace(Path(device))


def test_binary_garbage_is_bad_lines_not_a_traceback() -> None:
    trace = parse_trace([b'{"type":"header","format":"pyhv-exit-trace","version":1}\n', b"\xff\xfe\x00\n"])
    assert trace.bad_lines == 1


def test_cli_summarize(trace_file: Path) -> None:
    result = CliRunner().invoke(main, ["trace", "summarize", str(trace_file), "--by", "register"])
    assert result.exit_code == 0, result.output
    assert (
        "7 traced exits, 5 only counted (C fast path, pyhv's instruction emulator); run ended with triple-fault"
        in result.output
    )
    assert "COM1 THR" in result.output and "reason" not in result.output.split("\n", 2)[2]


def test_cli_summarize_reports_bad_lines_in_one_line(trace_file: Path) -> None:
    trace_file.write_text(trace_file.read_text() + "garbage\n")
    result = CliRunner().invoke(main, ["trace", "summarize", str(trace_file)])
    assert result.exit_code == 0
    assert "skipped 1 line(s)" in result.output and "Traceback" not in result.output


def test_cli_summarize_bad_file_exits_3(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_text("nope\n")
    result = CliRunner().invoke(main, ["trace", "summarize", str(path)])
    assert result.exit_code == 3 and result.output.count("\n") == 1 and "pyhv: error:" in result.output


def test_cli_plot_without_matplotlib_says_how_to_install(trace_file: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    result = CliRunner().invoke(main, ["trace", "plot", str(trace_file), "-o", str(tmp_path / "e.png")])
    assert result.exit_code == 3
    assert "pip install 'pyhv[plot]'" in result.output and not (tmp_path / "e.png").exists()


def test_cli_plot_checks_the_output_name(trace_file: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["trace", "plot", str(trace_file), "-o", str(tmp_path / "e.txt")])
    assert result.exit_code == 3 and "must end in" in result.output


def test_cli_plot_draws_a_png(trace_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (the optional extra pyhv[plot]) is not installed")
    output = tmp_path / "exits.png"
    result = CliRunner().invoke(main, ["trace", "plot", str(trace_file), "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "4 series" in result.output  # io out, io in, mmio read, shutdown


def test_trace_lines_are_json_objects(trace_file: Path) -> None:
    for line in trace_file.read_text().splitlines():
        assert isinstance(json.loads(line), dict)
