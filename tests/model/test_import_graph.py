"""The model library stands alone: importing it loads nothing of the training application or evaluation."""

import json
import subprocess
import sys

from tests.helpers.jobs import REPO


def test_the_model_library_imports_nothing_of_the_application():
    code = "import json, sys, pretrain.model; print(json.dumps([m for m in sys.modules if m.startswith('pretrain')]))"
    output = subprocess.check_output([sys.executable, "-c", code], cwd=REPO, text=True)
    loaded = json.loads(output.splitlines()[-1])  # DeepSpeed may log a line before it
    outside = [m for m in loaded if m not in ("pretrain", "pretrain.distributed", "pretrain.compat")
               and not m.startswith("pretrain.model")]
    assert "pretrain.model.objectives" in loaded and outside == []
