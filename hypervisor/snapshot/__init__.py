"""VM snapshots: save a running machine to a folder, rebuild it from there (docs/snapshots.md)."""
