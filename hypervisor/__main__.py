"""`python -m hypervisor`: the pyhv command."""

from hypervisor.cli import main
from hypervisor.process_signals import forget_caught_interrupts

try:
    main(prog_name="pyhv")
finally:
    forget_caught_interrupts()  # the status pyhv chose is the one the caller sees
