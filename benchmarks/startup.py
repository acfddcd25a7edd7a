"""Start-up tax of aim-llama for a Python process that never imports LlamaIndex.

    python benchmarks/startup.py [--runs 30] [--json]

Times three commands, interleaved (one of each per round, in rotating order, so that machine
load drifts hit all of them alike), and reports the median wall time of each and the overhead
of the medians against plain `python -c pass`:

* `plain`     — `python -c pass` with PYTHONPATH unset;
* `launcher`  — the same with the launcher's bootstrap directory on PYTHONPATH, i.e. what every
  Python process started under `aim-llama run` pays (user sitecustomize chain + lazy hook);
* `auto`      — `python -c "import aim_llama.auto"` (the one-line activation).

The target is ≤ 5 ms overhead; nothing heavy (LlamaIndex, Aim, pydantic) may be imported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = ROOT / "src" / "aim_llama" / "launcher" / "bootstrap"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIM_", "PYTHON"))}
    env.update(extra)
    return env


def commands() -> dict[str, tuple[list[str], dict[str, str]]]:
    """The measured commands and their environments."""
    try:
        import aim_llama.launcher as launcher

        bootstrap = launcher.BOOTSTRAP_DIR
    except ImportError:  # pragma: no cover - running from a checkout without install
        bootstrap = str(BOOTSTRAP)
    py = sys.executable
    return {
        "plain": ([py, "-c", "pass"], _env()),
        "launcher": ([py, "-c", "pass"], _env(PYTHONPATH=bootstrap)),
        "auto": ([py, "-c", "import aim_llama.auto"], _env()),
    }


def time_once(cmd: list[str], env: dict[str, str]) -> float:
    """Wall time of one run, in milliseconds (fails loudly if the command fails)."""
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdin=subprocess.DEVNULL)
    return (time.perf_counter() - start) * 1000.0


def heavy_modules(cmd: list[str], env: dict[str, str]) -> list[str]:
    """Heavy packages that the command imported (must be none)."""
    check = ("\nimport sys\nprint(sorted({m.split('.')[0] for m in sys.modules} & "
             "{'llama_index', 'aim', 'pydantic', 'pydantic_settings'}))")
    probe = [*cmd[:2], cmd[2] + check]
    out = subprocess.run(probe, env=env, check=True, capture_output=True, text=True).stdout
    return list(json.loads(out.strip().replace("'", '"')))


def measure(runs: int) -> dict[str, object]:
    """Interleaved runs; medians, overheads against `plain`, and the heavy-import check."""
    cmds = commands()
    names = list(cmds)
    for name in names:  # warm the OS caches and .pyc files
        time_once(*cmds[name])
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(runs):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            samples[name].append(time_once(*cmds[name]))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "runs": runs,
        "python": sys.version.split()[0],
        "median_ms": {k: round(v, 2) for k, v in medians.items()},
        "overhead_ms": {k: round(medians[k] - medians["plain"], 2) for k in names if k != "plain"},
        "heavy_imports": {k: heavy_modules(*cmds[k]) for k in names if k != "plain"},
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="rounds (each runs every command once)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    result = measure(max(args.runs, 1))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    med = result["median_ms"]
    over = result["overhead_ms"]
    heavy = result["heavy_imports"]
    assert isinstance(med, dict) and isinstance(over, dict) and isinstance(heavy, dict)
    print(f"python {result['python']}, {result['runs']} interleaved rounds, load {result['load_avg']}")
    print(f"  plain python -c pass            {med['plain']:7.2f} ms (median)")
    print(f"  + aim-llama run bootstrap       {med['launcher']:7.2f} ms  overhead {over['launcher']:+.2f} ms"
          f"  heavy imports: {heavy['launcher'] or 'none'}")
    print(f"  python -c 'import aim_llama.auto' {med['auto']:5.2f} ms  overhead {over['auto']:+.2f} ms"
          f"  heavy imports: {heavy['auto'] or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
