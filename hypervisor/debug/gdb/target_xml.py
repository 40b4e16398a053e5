"""Register layouts and gdb target descriptions for i386:x86-64 and i386.

gdb docs, "Target Descriptions" and "i386 Features": `org.gnu.gdb.i386.core` must hold the
general registers, rip/eip, eflags, the six segment selectors and the x87 registers, in that
order (gdb checks them by name, and amd64/i386 tdep count 40/32 core registers);
`org.gnu.gdb.i386.sse` adds xmm0-15 (xmm0-7 for i386) and mxcsr; `org.gnu.gdb.i386.segments`
holds fs_base and gs_base for x86-64, which gdb then knows as $fs_base/$gs_base. What QEMU shows beyond that
(its i386-64bit.xml: the other segment bases, k_gs_base, cr0/cr2/cr3/cr4/cr8, efer) goes in a pyhv
system feature, `org.pyhv.gdb.x86.sys`; gdb shows such registers in `info registers` by name.

The `g` packet carries the registers in the order of this table, each little-endian in
bitsize/8 bytes (gdb docs, "Packets": `g`). `RegisterSpec.source` names the value in the
target's register dictionary, which always uses the 64-bit names (the i386 layout reads the low
32 bits of rax as eax).
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

ARCH_X86_64 = "i386:x86-64"
ARCH_I386 = "i386"


@dataclass(frozen=True)
class RegisterSpec:
    name: str
    bitsize: int
    type: str
    feature: str
    source: str  # key in the target's register dictionary
    group: str | None = None

    @property
    def size(self) -> int:
        return self.bitsize // 8


CORE = "org.gnu.gdb.i386.core"
SSE = "org.gnu.gdb.i386.sse"
SEGMENTS = "org.gnu.gdb.i386.segments"
SYSTEM = "org.pyhv.gdb.x86.sys"

SEGMENT_SELECTORS = ("cs", "ss", "ds", "es", "fs", "gs")
# x87 control registers as gdb names them, each 32 bits in the core feature (i387 "fctrl" ...).
X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp") + tuple(f"r{i}" for i in range(8, 16))
# gdb's i386 order (i386-tdep.c register names): the hardware encoding order of the registers.
GPR32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
SYSTEM_REGISTERS = (
    "cs_base", "ss_base", "ds_base", "es_base", "k_gs_base",
    "gdtr_base", "gdtr_limit", "idtr_base", "idtr_limit",
    "cr0", "cr2", "cr3", "cr4", "cr8", "efer",
)  # fmt: skip


def _x87() -> list[RegisterSpec]:
    specs = [RegisterSpec(f"st{i}", 80, "i387_ext", CORE, f"st{i}", "float") for i in range(8)]
    specs += [RegisterSpec(name, 32, "int", CORE, name, "float") for name in X87_CONTROL]
    return specs


def _layout_x86_64() -> tuple[RegisterSpec, ...]:
    specs: list[RegisterSpec] = []
    for name in GPR64:
        kind = "data_ptr" if name in ("rbp", "rsp") else "int64"
        specs.append(RegisterSpec(name, 64, kind, CORE, name, "general"))
    specs.append(RegisterSpec("rip", 64, "code_ptr", CORE, "rip", "general"))
    specs.append(RegisterSpec("eflags", 32, "i386_eflags", CORE, "rflags", "general"))
    specs += [RegisterSpec(name, 32, "int32", CORE, name, "general") for name in SEGMENT_SELECTORS]
    specs += _x87()
    specs += [RegisterSpec(f"xmm{i}", 128, "vec128", SSE, f"xmm{i}", "vector") for i in range(16)]
    specs.append(RegisterSpec("mxcsr", 32, "i386_mxcsr", SSE, "mxcsr", "vector"))
    # No group: gdb then counts these integer registers as "general", so a plain
    # `info registers` shows them next to rax, as it does with QEMU.
    specs.append(RegisterSpec("fs_base", 64, "int", SEGMENTS, "fs_base"))
    specs.append(RegisterSpec("gs_base", 64, "int", SEGMENTS, "gs_base"))
    specs += [RegisterSpec(name, 32 if "limit" in name else 64, "int", SYSTEM, name) for name in SYSTEM_REGISTERS]
    return tuple(specs)


def _layout_i386() -> tuple[RegisterSpec, ...]:
    specs: list[RegisterSpec] = []
    for name in GPR32:
        kind = "data_ptr" if name in ("esp", "ebp") else "int32"
        specs.append(RegisterSpec(name, 32, kind, CORE, "r" + name[1:], "general"))
    specs.append(RegisterSpec("eip", 32, "code_ptr", CORE, "rip", "general"))
    specs.append(RegisterSpec("eflags", 32, "i386_eflags", CORE, "rflags", "general"))
    specs += [RegisterSpec(name, 32, "int32", CORE, name, "general") for name in SEGMENT_SELECTORS]
    specs += _x87()
    specs += [RegisterSpec(f"xmm{i}", 128, "vec128", SSE, f"xmm{i}", "vector") for i in range(8)]
    specs.append(RegisterSpec("mxcsr", 32, "i386_mxcsr", SSE, "mxcsr", "vector"))
    # Not in org.gnu.gdb.i386.segments: gdb 13's i386 numbering of that feature fails an
    # internal assertion (tdesc_use_registers) with this register set; as plain registers of
    # our feature they still show as $fs_base/$gs_base.
    specs.append(RegisterSpec("fs_base", 32, "int", SYSTEM, "fs_base"))
    specs.append(RegisterSpec("gs_base", 32, "int", SYSTEM, "gs_base"))
    specs += [RegisterSpec(name, 32, "int", SYSTEM, name) for name in SYSTEM_REGISTERS]
    return tuple(specs)


LAYOUTS: dict[str, tuple[RegisterSpec, ...]] = {ARCH_X86_64: _layout_x86_64(), ARCH_I386: _layout_i386()}

# Flag and vector types the features use (gdb's own 64bit-core.xml and 64bit-sse.xml define the
# same ones; a description must define every non-builtin type it names).
_EFLAGS_FIELDS = (
    ("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9),
    ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19),
    ("VIP", 20), ("ID", 21),
)  # fmt: skip
_MXCSR_FIELDS = (
    ("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6), ("IM", 7),
    ("DM", 8), ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15),
)  # fmt: skip
_VEC128 = """  <vector id="v8bf16" type="bfloat16" count="8"/>
  <vector id="v4f" type="ieee_single" count="4"/>
  <vector id="v2d" type="ieee_double" count="2"/>
  <vector id="v16i8" type="int8" count="16"/>
  <vector id="v8i16" type="int16" count="8"/>
  <vector id="v4i32" type="int32" count="4"/>
  <vector id="v2i64" type="int64" count="2"/>
  <union id="vec128">
    <field name="v8_bfloat16" type="v8bf16"/>
    <field name="v4_float" type="v4f"/>
    <field name="v2_double" type="v2d"/>
    <field name="v16_int8" type="v16i8"/>
    <field name="v8_int16" type="v8i16"/>
    <field name="v4_int32" type="v4i32"/>
    <field name="v2_int64" type="v2i64"/>
    <field name="uint128" type="uint128"/>
  </union>
"""


def _flags(type_id: str, fields: tuple[tuple[str, int], ...]) -> str:
    lines = [f'  <flags id="{type_id}" size="4">']
    lines += [f'    <field name="{name}" start="{bit}" end="{bit}"/>' for name, bit in fields]
    lines.append("  </flags>")
    return "\n".join(lines) + "\n"


def target_xml(arch: str) -> bytes:
    """The complete, self-contained target description (no xi:include) for `arch`."""
    layout = LAYOUTS[arch]
    parts = [
        '<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n<target version="1.0">\n',
        f"<architecture>{arch}</architecture>\n",
    ]
    feature = None
    for regnum, spec in enumerate(layout):
        if spec.feature != feature:
            if feature is not None:
                parts.append("</feature>\n")
            feature = spec.feature
            parts.append(f"<feature name={quoteattr(feature)}>\n")
            if feature == CORE:
                parts.append(_flags("i386_eflags", _EFLAGS_FIELDS))
            elif feature == SSE:
                parts.append(_VEC128 + _flags("i386_mxcsr", _MXCSR_FIELDS))
        group = f' group="{spec.group}"' if spec.group else ""
        parts.append(
            f'  <reg name="{spec.name}" bitsize="{spec.bitsize}" type="{spec.type}" regnum="{regnum}"{group}/>\n'
        )
    parts.append("</feature>\n</target>\n")
    return "".join(parts).encode("ascii")


def read_chunk(document: bytes, offset: int, length: int) -> bytes:
    """A qXfer read reply: `m` + data when more follows, `l` + data for the last chunk."""
    chunk = document[offset : offset + length]
    return (b"l" if offset + length >= len(document) else b"m") + chunk
