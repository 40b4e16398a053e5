"""qemu-img's tools as a library: info, map, compare, resize (images.py), convert, rebase, commit
(copying.py) and `-o` create options (create_options.py). Functions take paths and typed values
and return data or raise HypervisorError; nothing here parses a command line or prints
(hypervisor/cli/image.py does both)."""
