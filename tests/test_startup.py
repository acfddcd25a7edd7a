"""The start-up tax stays tiny: the bootstrap and `import aim_llama.auto` import only a few small modules.

Timing is measured by `benchmarks/startup.py`; here we check what makes it small, deterministically:
the exact set of modules each activation path adds to a bare `python -c pass`.
"""

from __future__ import annotations

import subprocess
import sys

from aim_llama.launcher import BOOTSTRAP_DIR
from conftest import clean_env

# What activation may add to interpreter start-up. Nothing else: not typing, threading, re,
# LlamaIndex, Aim or pydantic.
ALLOWED = {
    "__future__",
    "aim_llama",
    "aim_llama.errors",
    "aim_llama.auto",
    "aim_llama.importhook",
    "aim_llama.launcher",
    "aim_llama.launcher.startup",
    "aim_llama.switches",
    "sitecustomize",
}


def imported(code: str, **env: str) -> set[str]:
    base = clean_env(**env)
    base.pop("PYTHONPATH", None)
    base.update(env)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], env=base, capture_output=True, text=True,
        check=True,
    )
    return {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line and "cumulative" not in line
    }


def test_bootstrap_and_auto_add_only_tiny_modules():
    baseline = imported("pass")
    via_launcher = imported("pass", PYTHONPATH=BOOTSTRAP_DIR) - baseline
    via_import = imported("import aim_llama.auto") - baseline
    assert via_launcher <= ALLOWED, via_launcher - ALLOWED
    assert via_import <= ALLOWED, via_import - ALLOWED
    assert {"aim_llama.auto", "aim_llama.importhook"} <= via_launcher  # it did activate
    assert {"aim_llama.auto", "aim_llama.importhook"} <= via_import


def test_the_launcher_cli_itself_does_not_import_pydantic():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom aim_llama.cli import build_parser\nbuild_parser()\n"
         "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'aim', 'llama_index')))"],
        env=clean_env(), capture_output=True, text=True, check=True,
    )
    assert proc.stdout.strip() == "[]"
