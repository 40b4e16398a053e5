from hypervisor.cli import main

main(prog_name="pyhv")
