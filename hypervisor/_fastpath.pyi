# Typed stub of the cffi extension built from csrc/ (csrc/build_fastpath.py). cffi's `ffi` and
# `lib` are dynamic: every KVM_* constant and pyhv_* function of the cdef is an attribute of
# `lib`, and the struct types are reached through `ffi.new("struct ...")`.
from typing import Any

ffi: Any
lib: Any
