"""hypervisor/units.py: the one size parser, with qemu_strtosz's grammar (QEMU util/cutils.c)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypervisor.errors import ConfigError
from hypervisor.units import MAX_SIZE, SUFFIXES, parse_size

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@pytest.mark.parametrize(
    ("text", "default_unit", "expected"),
    [
        ("512", "", 512),
        ("512", "M", 512 * MiB),  # --mem: a bare number is MiB, as for QEMU's -m
        ("65536b", "", 65536),
        ("4k", "", 4 * KiB),
        ("4K", "", 4 * KiB),
        ("2G", "M", 2 * GiB),
        ("1.5G", "", 3 * GiB // 2),
        (".5G", "", GiB // 2),  # refused by pyhv's old --mem parser
        ("2.k", "", 2 * KiB),
        ("1.1k", "", 1126),  # a fraction is truncated to whole bytes, as QEMU does (old --mem: refused)
        ("1.5", "M", 3 * MiB // 2),  # the default unit is the multiplier
        (" 10G", "", 10 * GiB),  # strtod skips leading white space
        ("7E", "", 7 << 60),
    ],
)
def test_sizes_qemu_img_takes(text: str, default_unit: str, expected: int) -> None:
    assert parse_size(text, default_unit) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("512MiB", "not a size"),  # qemu_strtosz reads one suffix letter, then wants the end
        ("1 G", "not a size"),
        ("1G ", "not a size"),
        ("1G\n", "not a size"),
        ("lots", "not a size"),
        ("", "not a size"),
        ("-1", "not a size"),
        ("1x", "not a size"),
        ("0x10", "not a size"),
        ("1.5", "not a whole number of bytes"),  # a fraction needs a multiplier above one
        ("1.5b", "not a whole number of bytes"),
        ("8E", "too large"),  # 2**63 is past INT64_MAX
        ("99999999999999999999", "too large"),
    ],
)
def test_what_qemu_img_refuses_is_one_line_naming_the_option(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_size(text, what="cluster_size")
    message = str(caught.value)
    assert message.startswith(f"invalid cluster_size {text!r}: {why}") and "\n" not in message


@given(st.integers(min_value=0, max_value=1 << 40), st.sampled_from(sorted(SUFFIXES)))
def test_a_whole_number_with_any_suffix_is_that_many_units(number: int, suffix: str) -> None:
    expected = number * SUFFIXES[suffix]
    if expected > MAX_SIZE:
        with pytest.raises(ConfigError):
            parse_size(f"{number}{suffix}")
    else:
        assert parse_size(f"{number}{suffix.upper()}") == parse_size(f"{number}{suffix}") == expected
