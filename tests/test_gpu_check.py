"""benchmarks/gpu_check.sh --dry-run: the GPU check's code on CPU (tiny preset, fp32), one JSON on stdout."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_on_cpu_and_prints_one_json():
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # stdout is the JSON alone
    assert set(report) == {"dry_run", "device", "torch", "flash_attn_installed", "flash_attn_tests",
                           "matmul_peak_tflops", "attention", "zero3_step", "seconds"}
    assert report["dry_run"] is True and report["device"] == "cpu"
    tests = report["flash_attn_tests"]
    assert tests["returncode"] == 0 and tests["failed"] == 0 and tests["passed"] + tests["skipped"] >= 4
    assert report["matmul_peak_tflops"]["tflops"] > 0 and report["matmul_peak_tflops"]["dtype"] == "torch.float32"
    attention = report["attention"]
    assert attention["samples_per_s"]["flash_attn"] is None  # no CUDA here
    assert attention["samples_per_s"]["sdpa"] > 0 and attention["samples_per_s"]["eager"] > 0
    assert attention["relative_to_eager"]["eager"] == 1.0
    step = report["zero3_step"]
    assert (step["preset"], step["batch"], step["dtype"], step["zero_stage"]) == ("tiny", 2, "torch.float32", 3)
    assert step["samples_per_s"] > 0 and step["mfu"] > 0 and step["tflops_per_s"] > 0
    assert step["peak_memory_gb"] > 0 and step["losses_finite"] is True
    # MFU: the step's FLOP/s over the matmul peak measured in the same run
    assert step["mfu"] == pytest.approx(step["tflops_per_s"] / report["matmul_peak_tflops"]["tflops"], rel=1e-3)
