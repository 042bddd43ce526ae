"""Writing run files so that a crash never leaves one that looks complete, and finding out early
whether a directory takes files at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def replace_text(path: Path, text: str) -> None:
    """Write beside `path`, then rename into place: the file is the old one or the new one, whole, even
    after a node crash (contents and rename are fsynced), never a part."""
    partial = path.with_name(path.name + ".tmp")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def probe_writable(directory: Path) -> None:
    """Create `directory` if needed and write and sync a small file there, under a name of its own (every
    rank probes at once); raises OSError."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-") as probe:
        probe.write(b"0" * 4096)
        probe.flush()
        os.fsync(probe.fileno())
