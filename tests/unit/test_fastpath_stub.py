"""The compiled module's declarations come from the headers in csrc/, and its stub matches them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "csrc"))
spec = importlib.util.spec_from_file_location("build_fastpath", ROOT / "csrc" / "build_fastpath.py")
assert spec is not None and spec.loader is not None
build_fastpath = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_fastpath)


def test_the_committed_stub_is_the_generated_one() -> None:
    expected = build_fastpath.stub_text(build_fastpath.header_text())
    assert build_fastpath.STUB_PATH.read_text() == expected, "run: python csrc/build_fastpath.py --stub"


def test_every_declared_function_and_constant_is_in_the_module() -> None:
    from hypervisor.kvm.ffi import lib

    stub = build_fastpath.STUB_PATH.read_text()
    names = []
    for line in stub.splitlines():
        if line.startswith("    def "):
            names.append(line.split()[1].split("(")[0])
        elif line.startswith("    "):
            names.append(line.split(":")[0].strip())
    assert len(names) > 100
    missing = [name for name in names if not hasattr(lib, name)]
    assert missing == []


def test_cdef_rewrites_the_header_section() -> None:
    header = """
#define OUTSIDE 1
/* PYHV_CFFI_BEGIN */
#define LIMIT 8 /* a comment */
struct thing {
    int visible;
    int hidden; /* C only */
    char name[LIMIT];
};
int pyhv_thing(struct thing *t);
/* PYHV_CFFI_END */
"""
    cdef = build_fastpath.fastpath_cdef(header)
    assert "OUTSIDE" not in cdef and "#define LIMIT ..." in cdef
    assert "hidden" not in cdef and "    ...;\n};" in cdef and "char name[...];" in cdef
    assert "int pyhv_thing(struct thing *t);" in cdef



def test_only_the_kvm_layer_imports_the_compiled_module() -> None:
    offenders = []
    for path in (ROOT / "hypervisor").rglob("*.py"):
        relative = path.relative_to(ROOT / "hypervisor")
        if relative.parts[0] == "kvm":
            continue
        text = path.read_text()
        if "_fastpath" in text or "hypervisor.kvm.ffi" in text:
            offenders.append(str(relative))
    assert offenders == []
