"""Pure functions that load kernels into guest memory and build the boot-time CPU state.

No KVM here: everything works on a `GuestMemory` and returns plain data. The machine uses it as:

    from hypervisor.boot.layout import guest_layout, virtio_mmio_window
    from hypervisor.boot.loader import prepare_kernel
    from hypervisor.boot.raw import prepare_raw

    guest = guest_layout(mem_size)                      # RAM regions + e820 (MMIO hole 3-4 GiB)
    memory = GuestMemory(list(guest.memory_regions))
    windows = [virtio_mmio_window(i) for i in range(n_disks)]   # gpa, size, irq per device
    boot = prepare_kernel(memory, guest, kernel_bytes, cmdline, initrd=initrd_bytes, cpus=cpus,
                          mmio_devices=windows, entry="auto", name=str(path), program_name=path.name,
                          unpack_bzimage=True)
    # or: boot = prepare_raw(memory, data, address)
    boot.entry        # EntryState: rip, rsp, rflags, gprs {"rsi": ...}, segments, gdt, idt, cr0/3/4, efer
    boot.protocol     # "linux-64" | "linux-32" | "pvh" | "multiboot" | "raw"
    boot.placements   # [Placement(name, gpa, size)] of everything written
    boot.cmdline      # the command line the guest got (with virtio_mmio.device=... appended)
    boot.source       # e.g. "ELF vmlinux", "bzImage (lz4 payload unpacked on the host)"

and, per vCPU, `hypervisor.boot.cpuid.guest_cpuid(supported, vcpu_id, cpus, clear=...)` for
KVM_SET_CPUID2. Every bad kernel, initrd or command line raises `BootError` with one line.

Modules:
- layout: the guest physical memory map (constants), `guest_layout`, e820, virtio-mmio windows
- cpu_state: `EntryState`, `Segment`, `DescriptorTable`, the real/protected/long mode entry
  states, `setup_gdt`; page_tables: `setup_identity_page_tables`
- image_format: `detect_kernel_format`, xz decompression; elf: ELF32/64 reader
- bzimage, zero_page (struct boot_params), linux (`prepare_linux`), pvh (hvm_start_info),
  payload (a bzImage's compressed vmlinux unpacked on the host, every codec Linux has), lzop (the
  lzop container around LZO1X blocks)
- multiboot (`prepare_multiboot`), raw (`prepare_raw`, `load_raw`), loader (`prepare_kernel`)
- placement: `BootImage`, `Placement`, command line and initrd placement
- mptable: Intel MP spec 1.4 tables; acpi: RSDP, RSDT/XSDT, FADT, FACS, MADT, DSDT;
  platform_tables: where they go; cpuid: `CpuidEntry`, `guest_cpuid`, `linux_feature_bit`
"""
