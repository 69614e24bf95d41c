"""Process-wide settings rl3d makes before torch loads: OpenMP threads wait passively unless the user
chose otherwise, and no command module imports torch before that."""
from __future__ import annotations

import os
import subprocess
import sys


def _run(code: str, **env) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, check=True, text=True,
                           stdout=subprocess.PIPE).stdout.strip()


def test_stages_set_passive_openmp_waiting_unless_the_user_chose():
    code = "import os, rl3d.stages; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert _run(code) == "PASSIVE"
    assert _run(code, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


def test_commands_import_no_torch_before_the_setting():
    code = ("import importlib, sys\n"
            "for m in ('gen', 'render', 'reward', 'rl_step', 'train', 'sft', 'eval'):\n"
            "    importlib.import_module('rl3d.cli.' + m)\n"
            "import os; print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))")
    assert _run(code) == "False PASSIVE"
