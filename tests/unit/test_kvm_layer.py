"""hypervisor/kvm/ is the bottom layer (DESIGN.md, issue 11): it imports nothing of pyhv's but
itself, the compiled module and the error hierarchy, not even for typing."""

from __future__ import annotations

import ast
from pathlib import Path

KVM_PACKAGE = Path(__file__).resolve().parents[2] / "hypervisor" / "kvm"
ALLOWED = ("hypervisor.kvm", "hypervisor._fastpath", "hypervisor.errors")


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def test_kvm_imports_nothing_above_it() -> None:
    outside = [
        f"{path.name}:{line} imports {module}"
        for path in sorted(KVM_PACKAGE.glob("*.py"))
        for line, module in _imported_modules(path)
        if module.split(".")[0] == "hypervisor" and not module.startswith(ALLOWED)
    ]
    assert outside == []
