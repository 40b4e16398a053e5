"""Bad input to `pyhv image`: one line on stderr, a documented exit status, the file unchanged."""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hypervisor.cli import main

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (qemu-utils) not installed")

CONFIG_ERROR = 3  # errors.py ConfigError/ImageError.exit_status
USAGE_ERROR = 2  # an option or value click rejects (docs/exit-status.md)
CHECK_FAILED = 1  # qemu-img check: the check could not be completed
COMPARE_ERROR = 2  # qemu-img compare: error


def pyhv(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["image", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"


def assert_one_line_error(err: str) -> None:
    assert err.startswith("pyhv image: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err


@pytest.fixture()
def good(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    assert subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "good.qcow2", "8M"]).returncode == 0
    subprocess.run(["qemu-io", "-c", "write -P 1 0 1M", "good.qcow2"], capture_output=True, check=True)
    return tmp_path / "good.qcow2"


def corrupt_copy(good: Path, name: str, offset: int, data: bytes, truncate: int | None = None) -> Path:
    path = good.parent / name
    shutil.copy(good, path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        if truncate is not None:
            f.truncate(truncate)
    return path


def corrupted_images(good: Path) -> list[Path]:
    return [
        corrupt_copy(good, "truncated.qcow2", 0, b"QFI\xfb", truncate=40),
        corrupt_copy(good, "version9.qcow2", 4, struct.pack(">I", 9)),
        corrupt_copy(good, "cluster_bits40.qcow2", 20, struct.pack(">I", 40)),
        corrupt_copy(good, "unknown_incompat.qcow2", 72, struct.pack(">Q", 1 << 20)),
        corrupt_copy(good, "l1_past_end.qcow2", 40, struct.pack(">Q", 1 << 40)),
        corrupt_copy(good, "l1_unaligned.qcow2", 40, struct.pack(">Q", 0x30008)),
        corrupt_copy(good, "refcount_table_in_header.qcow2", 48, struct.pack(">Q", 0)),
        corrupt_copy(good, "encrypted.qcow2", 32, struct.pack(">I", 2)),
        corrupt_copy(good, "extension_overrun.qcow2", 112, struct.pack(">II", 0x12345678, 0xFFFFFF)),
    ]


@pytest.mark.parametrize(
    "command",
    [
        ["info"],
        ["info", "--output=json"],
        ["map"],
        ["check"],
        ["check", "-r", "all"],
        ["snapshot", "-c", "x"],
        ["resize", "FILE", "+1M"],
        ["convert", "-O", "raw"],
    ],
)
def test_corrupt_images_give_one_line_and_stay_unchanged(good: Path, command: list[str]) -> None:
    for path in corrupted_images(good):
        before = digest(path)
        args = [arg if arg != "FILE" else path.name for arg in command]
        if "FILE" not in command:
            args.append(path.name)
        if command[0] == "convert":
            args.append("out.raw")
        status, _, err = pyhv(*args)
        assert status == (CHECK_FAILED if command[0] == "check" else CONFIG_ERROR), (path.name, err)
        assert_one_line_error(err)
        assert digest(path) == before, path.name


BAD_USAGE: list[tuple[list[str], int]] = [
    (["info", "missing.qcow2"], CONFIG_ERROR),
    (["info", "-f", "vmdk", "good.qcow2"], USAGE_ERROR),
    (["info", "--output=xml", "good.qcow2"], USAGE_ERROR),
    (["check", "missing.qcow2"], CHECK_FAILED),
    (["check", "-r", "everything", "good.qcow2"], CHECK_FAILED),
    (["compare", "good.qcow2", "missing.qcow2"], COMPARE_ERROR),
    (["create", "-f", "qcow2", "good.qcow2", "abc"], CONFIG_ERROR),
    (["create", "-f", "qcow2", "good.qcow2", "-5"], USAGE_ERROR),
    (["create", "-f", "qcow2", "good.qcow2", "1.5"], CONFIG_ERROR),
    (["create", "-f", "qcow2", "-o", "cluster_size=1000", "good.qcow2", "1M"], CONFIG_ERROR),
    (["create", "-f", "qcow2", "-o", "refcount_bits=3", "good.qcow2", "1M"], CONFIG_ERROR),
    (["create", "-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "good.qcow2", "1M"], CONFIG_ERROR),
    (["create", "-f", "qcow2", "-o", "foo=1", "good.qcow2", "1M"], CONFIG_ERROR),
    (["create", "-f", "qcow2", "-o", "lazy_refcounts=maybe", "good.qcow2", "1M"], CONFIG_ERROR),
    (["create", "-f", "qcow2", "-b", "missing.qcow2", "-F", "qcow2", "good.qcow2"], CONFIG_ERROR),
    (["create", "-f", "qcow2", "-b", "other.qcow2", "good.qcow2"], CONFIG_ERROR),
    (["create", "-f", "qcow2", "good.qcow2"], CONFIG_ERROR),
    (["resize", "good.qcow2", "abc"], CONFIG_ERROR),
    (["resize", "good.qcow2", "-1M"], CONFIG_ERROR),
    (["resize", "--shrink", "good.qcow2", "512k"], CONFIG_ERROR),
    (["convert", "-O", "qcow2", "good.qcow2", "good.qcow2"], CONFIG_ERROR),
    (["convert", "-O", "raw", "-c", "good.qcow2", "out.raw"], CONFIG_ERROR),
    (["convert", "-O", "raw", "-t", "none", "good.qcow2", "out.raw"], CONFIG_ERROR),
    (["convert", "-O", "raw", "-t", "", "good.qcow2", "out.raw"], CONFIG_ERROR),
    (["convert", "-O", "qcow2", "-l", "snapshot.name=nope", "good.qcow2", "out.qcow2"], CONFIG_ERROR),
    (["snapshot", "-d", "nope", "good.qcow2"], CONFIG_ERROR),
    (["snapshot", "-a", "nope", "good.qcow2"], CONFIG_ERROR),
    (["snapshot", "-c", "a", "-d", "b", "good.qcow2"], CONFIG_ERROR),
    (["rebase", "-b", "missing.qcow2", "-F", "qcow2", "good.qcow2"], CONFIG_ERROR),
    (["rebase", "good.qcow2"], USAGE_ERROR),
    (["commit", "good.qcow2"], CONFIG_ERROR),
    (["bogus-command"], USAGE_ERROR),
]


@pytest.mark.parametrize("args, status", BAD_USAGE, ids=[" ".join(a) for a, _ in BAD_USAGE])
def test_bad_usage_gives_one_line_and_changes_nothing(good: Path, args: list[str], status: int) -> None:
    before = digest(good)
    exit_status, _, err = pyhv(*args)
    assert exit_status == status, err
    assert_one_line_error(err)
    assert digest(good) == before


def test_an_image_in_use_by_qemu_is_refused(good: Path) -> None:
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed")
    holder = subprocess.Popen(
        ["qemu-io", str(good)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.3)  # qemu-io opens the image and takes its locks
        before = digest(good)
        status, _, err = pyhv("snapshot", "-c", "while-running", "good.qcow2")
        assert status == CONFIG_ERROR
        assert_one_line_error(err)
        assert digest(good) == before
    finally:
        holder.communicate(b"quit\n", timeout=10)


def test_sizes_accept_qemu_suffixes(good: Path) -> None:
    for text, expected in (
        ("1k", 1024),
        ("1.5M", 3 << 19),
        ("2G", 2 << 30),
        ("1T", 1 << 40),
        ("4096", 4096),
        ("512b", 512),
    ):
        status, _, err = pyhv("create", "-q", "-f", "qcow2", "s.qcow2", text)
        assert status == 0, err
        info = subprocess.run(["qemu-img", "info", "--output=json", "s.qcow2"], capture_output=True, text=True)
        assert f'"virtual-size": {expected}' in info.stdout


def test_create_refuses_to_replace_an_image_in_use(good: Path) -> None:
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed")
    holder = subprocess.Popen(
        ["qemu-io", str(good)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.3)
        before = digest(good)
        for args in (
            ["create", "-f", "qcow2", "good.qcow2", "1M"],
            ["convert", "-O", "raw", "other.raw", "good.qcow2"],
        ):
            if args[0] == "convert":
                subprocess.run(["qemu-img", "create", "-q", "-f", "raw", "other.raw", "1M"], check=True)
            status, _, err = pyhv(*args)
            assert status == CONFIG_ERROR, err
            assert_one_line_error(err)
            assert digest(good) == before
    finally:
        holder.communicate(b"quit\n", timeout=10)
