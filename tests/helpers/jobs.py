"""Starting real training jobs from tests, and reading what they logged."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]

# In a job's command or environment: the rendezvous port, filled in by `run` / `run_together`.
PORT = "<free port>"
# torch's TCPStore when the rendezvous port was taken by someone else before rank 0 bound it
PORT_TAKEN = "EADDRINUSE"
PORT_ATTEMPTS = 3

# The tiny job every training test runs: 8 steps of 8 samples per rank, a log line per step, a checkpoint every 4.
TINY_JOB = {"schedule.max_steps": 8, "schedule.warmup_steps": 2, "schedule.micro_batch_size": 8,
            "logging.every": 1, "checkpoint.every": 4}


def recipe_flags(shards: dict, tokenizer_dir: Path, run_dir: Path, *overrides: dict, val: bool = False) -> list[str]:
    """`--recipe tiny_synthetic` on the session's synthetic shards and tokenizer, writing runs under `run_dir`,
    evaluating on the validation shards only with `val`, with ViT's linear patch stem (the presets' own, whose export
    has a Hugging Face image encoder), then `--key value` for each override (later wins)."""
    flags = {"recipe": "tiny_synthetic", "data.train": shards["train"], "data.val": shards["val"] if val else "null",
             "data.tokenizer": tokenizer_dir, "logging.run_dir": run_dir, "model.patch_stem": "linear"}
    for more in overrides:
        flags |= more
    return [part for key, value in flags.items() for part in (f"--{key}", str(value))]


def free_port() -> int:
    """A port nobody listens on now. Not reserved: use PORT with `run`, which retries when it was taken."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], env: dict | None = None, timeout: int = 600, new_session: bool = False):
    """Run to the end. `new_session`: the job gets its own process group, as a scheduler's job has.
    PORT in the command or environment: see `run_together`."""
    return run_together([(cmd, env)], timeout=timeout, new_session=new_session)[0]


def run_together(jobs: list[tuple[list[str], dict | None]], timeout: int = 600,
                 new_session: bool = False) -> list[subprocess.CompletedProcess]:
    """Start every (command, extra environment) at once in the repository root, e.g. one launcher per node,
    and wait for all. PORT anywhere in them becomes one free port (`.port` of each result); if another process
    took it before the job bound it, the jobs run again on another."""
    uses_port = any(PORT in text for cmd, env in jobs for text in [*cmd, *(env or {}).values()])
    for _ in range(PORT_ATTEMPTS):
        port = str(free_port())
        started = [_start([arg.replace(PORT, port) for arg in cmd],
                          {key: value.replace(PORT, port) for key, value in (env or {}).items()}, new_session)
                   for cmd, env in jobs]
        with ThreadPoolExecutor(len(started)) as pool:  # read every job's pipes at once: none may block
            done = list(pool.map(lambda proc: _finish(proc, timeout, new_session), started))
        if not uses_port or not any(PORT_TAKEN in proc.stdout + proc.stderr for proc in done):
            break
    for proc in done:
        proc.port = int(port)
    return done


def _start(cmd: list[str], env: dict, new_session: bool) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHON": sys.executable, **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=new_session)


def _finish(proc: subprocess.Popen, timeout: int, new_session: bool) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        if new_session:
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # the launcher and every rank under it
            children = []
            with contextlib.suppress(psutil.NoSuchProcess):
                children = psutil.Process(proc.pid).children(recursive=True)
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def logged_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, dict]:
    return {row["step"]: row for row in logged_rows(run_dir) if "loss/total" in row}
