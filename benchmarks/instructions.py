"""Instructions per query on the application's side, counted by valgrind: no machine noise.

    python benchmarks/instructions.py [--queries 150] [--configs uninstrumented,aim-llama]

Wall-time ratios on a small VM drift by ±30 % between processes. This runs workload.py under
`valgrind --tool=callgrind` twice per configuration, with 0 and with N timed queries, and
divides the difference of the instruction totals by N: the instructions one query costs in
the application's process (all its threads, aim-llama's sender thread included; the writer
process is a child and is not counted — `writer_replay.py` measures it). Needs valgrind
(Debian's package). Takes a few minutes: valgrind runs Python ~50× slower.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from overhead import config_env


def count(config: str, queries: int, tmp: Path) -> int:
    """Instructions of one whole workload.py process under callgrind."""
    out = tmp / f"cg.{config}.{queries}.out"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
           str(HERE / "workload.py"), config, "--queries", str(queries), "--warmup", "20",
           "--out", str(tmp / f"{config}.{queries}.json")]
    subprocess.run(cmd, env=config_env(config, tmp / f"repo-{config}-{queries}"), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    match = re.search(r"^summary:\s*(\d+)", out.read_text(errors="replace"), re.M)
    if match is None:
        raise RuntimeError(f"no instruction total in {out}")
    return int(match.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=150)
    ap.add_argument("--configs", default="uninstrumented,aim-llama")
    args = ap.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    if args.queries < 100:  # (the per-process warm-up and exit work are not subtracted exactly)
        print(f"note: {args.queries} queries are too few for a stable per-query figure; "
              "use 100 or more", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="aim-llama-instr-") as tmp_name:
        tmp = Path(tmp_name)
        jobs = [(c, n) for c in configs for n in (0, args.queries)]
        with ThreadPoolExecutor(max_workers=2) as pool:
            totals = dict(zip(jobs, pool.map(lambda job: count(job[0], job[1], tmp), jobs), strict=True))
    per_query = {c: (totals[c, args.queries] - totals[c, 0]) / args.queries for c in configs}
    base = per_query.get("uninstrumented")
    print("| configuration | instructions per query | vs uninstrumented |\n|---|---:|---:|")
    for c in configs:
        ratio = f"{per_query[c] / base:.3f}×" if base else "—"
        print(f"| {c} | {per_query[c] / 1e6:.2f} M | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
