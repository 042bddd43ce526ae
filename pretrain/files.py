"""Writing run files so that a crash never leaves one that looks complete, and finding out early
whether a directory takes files at all."""

from __future__ import annotations

import os
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


def probe_writable(directory: Path, name: str = ".write-probe") -> None:
    """Create `directory` if needed and write, sync and remove a small file there; raises OSError."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / name
    with open(probe, "wb") as f:
        f.write(b"0" * 4096)
        f.flush()
        os.fsync(f.fileno())
    probe.unlink()
