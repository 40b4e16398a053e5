"""The documentation's Python examples compile, and the API examples run against a test guest."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.guests.build import with_parameters

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def python_blocks(path: Path) -> list[str]:
    return _BLOCK.findall(path.read_text())


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_every_python_example_compiles(path: Path) -> None:
    for number, block in enumerate(python_blocks(path)):
        compile(block, f"{path.name} example {number}", "exec")


@pytest.mark.kvm
@pytest.mark.timeout(60)
def test_the_api_examples_run(guest_binary, tmp_path: Path, monkeypatch) -> None:
    blocks = python_blocks(ROOT / "docs" / "api.md")
    guest = with_parameters(guest_binary("real_mode").read_bytes(), exit_code=0)
    (tmp_path / "guest.bin").write_bytes(guest)
    monkeypatch.chdir(tmp_path)
    first: dict[str, object] = {}
    exec(compile(blocks[0], "api.md example 0", "exec"), first)  # asserts inside the example
    assert first["result"].exit_status == 0  # type: ignore[attr-defined]
    hooks: dict[str, object] = {}
    exec(compile(blocks[1], "api.md example 1", "exec"), hooks)
    description = hooks["third_write"](guest)  # type: ignore[operator]
    assert description.startswith("breakpoint") and "port=0x3f8" in description
    assert os.getcwd() == str(tmp_path)
