"""Starting real training jobs from tests, and reading what they logged."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], env: dict | None = None, timeout: int = 600, new_session: bool = False):
    """Run to the end. `new_session`: the job gets its own process group, as a scheduler's job has."""
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=new_session)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def logged_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, dict]:
    return {row["step"]: row for row in logged_rows(run_dir) if "loss/total" in row}
