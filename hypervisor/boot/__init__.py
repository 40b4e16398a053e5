"""Pure functions that load kernels into guest memory and build the boot-time CPU state."""
