"""Console backends the machine plugs into the UART: where guest output goes, where input comes from.

One concern per module:

* `protocol`: the `Console` protocol every backend implements and `ConsoleBase`, which records
  when the first byte arrived and how many came;
* `memory`: `NullConsole` (discards) and `MemoryConsole` (captures, for the API and tests);
* `file`: `FileConsole` (appends to a file) and `write_all`;
* `terminal`: `StdioConsole` (stdout and stdin; raw mode and QEMU's Ctrl-A escape on a terminal).

Watching the output stream is the machine's business (`Machine.output_watchers`), and boot
phases are timestamped by hypervisor.debug.phase_watcher.
"""

from hypervisor.console.file import FileConsole
from hypervisor.console.memory import MemoryConsole, NullConsole
from hypervisor.console.protocol import Console, ConsoleBase, Feed
from hypervisor.console.terminal import StdioConsole

__all__ = [
    "Console",
    "ConsoleBase",
    "Feed",
    "FileConsole",
    "MemoryConsole",
    "NullConsole",
    "StdioConsole",
]
