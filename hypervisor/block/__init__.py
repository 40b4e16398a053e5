"""Disk backends: raw files and qcow2 images behind the BlockBackend protocol."""
