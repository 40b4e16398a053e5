"""A gdb remote serial protocol stub for pyhv guests (`pyhv run --gdb tcp:HOST:PORT|unix:PATH`).

Layers, each testable without the one below it: `packets` (RSP framing), `target_xml` (register
layouts and target descriptions), `stub` (the command layer over a `GdbTarget`), `server` (the
socket listener), `machine_target` (a `GdbTarget` over a running pyhv `Machine`).
"""
