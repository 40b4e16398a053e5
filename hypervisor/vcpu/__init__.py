"""vCPU threads, exit dispatch and the in-hypervisor instruction emulator for kvm_pvm hosts."""
