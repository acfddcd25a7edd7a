"""Side-by-side overhead benchmark of aim-llama (issue 3). One command, not part of CI:

    python benchmarks/overhead.py                      # full: 300 queries x 5 repetitions
    python benchmarks/overhead.py --queries 100 --reps 3 --import-reps 6   # quick check

Measures, on the same mock RAG pipeline (MockLLM, MockEmbedding, 50 documents), each in fresh
subprocesses with configurations alternating across repetitions:
  uninstrumented | aimcallback (llama-index-callbacks-aim) | aim-llama (defaults: process
  writer) | aim-llama-thread (AIM_LLAMA_WRITER=thread)
then reads every run back from its Aim repo (tests/aimread.py) to count the values recorded per
query, compares the same configurations in lockstep (lockstep.py: live processes taking
turns, ratios paired within each round, far less sensitive to the machine's drift), and
measures `import aim_llama.auto`, the exit flush of 10 k queued records and the RSS
growth under a 100 k-record burst. Prints a Markdown table and the machine, writes JSON to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from aimread import read_run, run_hashes

PY = sys.executable
CONFIGS = ("uninstrumented", "aimcallback", "aim-llama", "aim-llama-thread")
# Opt-in diagnostics (see workload.py): aim-llama's handler alone; its whole app side minus Aim.
DIAGNOSTICS = ("diag-handler-only", "diag-writer-devnull")
PACKAGES = ("aim-llama", "aim", "aimrocks", "llama-index-core", "llama-index-callbacks-aim",
            "pydantic-settings", "psutil")


# -- environment ----------------------------------------------------------------------------
def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without AIM_* / AIM_LLAMA_* / __AIM* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIM_", "__AIM")) and k != "PYTHONSTARTUP"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def config_env(config: str, repo: Path) -> dict[str, str]:
    """aim-llama configs get AIM_REPO (and the writer choice); everything else stays default."""
    if config == "aim-llama":
        return clean_env(AIM_REPO=str(repo))
    if config == "aim-llama-thread":
        return clean_env(AIM_REPO=str(repo), AIM_LLAMA_WRITER="thread")
    if config.startswith("diag-"):
        return clean_env(AIM_REPO=str(repo))
    return clean_env()


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "loadavg_start": os.getloadavg(),
    }


# -- reading runs back -----------------------------------------------------------------------
def count_values(repo: Path) -> dict[str, Any]:
    """Metric points + text records of the repo's runs, without `__system__*` and terminal `logs`."""
    hashes = run_hashes(repo)
    metrics = texts = 0
    by_name: dict[str, int] = {}
    dropped = None
    for run_hash in hashes:
        data = read_run(repo, run_hash)
        for (name, _ctx), points in data.metrics.items():
            if name.startswith("__system__"):
                continue
            metrics += len(points)
            by_name[name] = by_name.get(name, 0) + len(points)
            if name == "dropped_records" and points:
                dropped = max(dropped or 0, int(max(v for _s, v in points)))
        for (name, _ctx), items in data.texts.items():
            if name == "logs":
                continue
            texts += len(items)
            by_name[name] = by_name.get(name, 0) + len(items)
    return {"runs": len(hashes), "metrics": metrics, "texts": texts, "values": metrics + texts,
            "by_name": by_name, "dropped_records": dropped}


# -- one workload repetition -----------------------------------------------------------------
def run_workload(config: str, queries: int, args: argparse.Namespace, tmp: Path, tag: str,
                 profile: Path | None = None, attribute: bool = False) -> dict[str, Any]:
    repo = tmp / f"repo-{config}-{tag}"
    out = tmp / f"out-{config}-{tag}.json"
    cmd = [PY, str(HERE / "workload.py"), config, "--out", str(out), "--queries", str(queries),
           "--warmup", str(args.warmup), "--docs", str(args.docs), "--repo", str(repo)]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    if args.no_settle:
        cmd.append("--no-settle")
    if attribute:
        cmd.append("--attribute")
    proc = subprocess.run(cmd, cwd=tmp, env=config_env(config, repo), capture_output=True,
                          text=True, timeout=900)
    exited = time.time()
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{config} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["exit_ms"] = (exited - result["loop_end_wall"]) * 1000.0
    result["stderr_tail"] = proc.stderr[-500:] if proc.stderr.strip() else ""
    if config.startswith(("aim-llama", "diag-")) and not result.get("instrumented"):
        raise RuntimeError(f"{config}: aim-llama was not active in the child")
    if config in ("aimcallback", "aim-llama", "aim-llama-thread"):
        result["readback"] = count_values(repo)
    if not args.keep:
        shutil.rmtree(repo, ignore_errors=True)
    return result


# -- import cost -----------------------------------------------------------------------------
def time_cmd(code: str, env: dict[str, str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([PY, "-c", code], env=env, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def import_cost(reps: int, tmp: Path) -> dict[str, Any]:
    """Medians over fresh interpreters, alternating: bare, +aim_llama.auto, llama_index, both."""
    env = clean_env(AIM_REPO=str(tmp / "repo-import"))
    codes = {
        "pass": "pass",
        "auto": "import aim_llama.auto",
    }
    samples: dict[str, list[float]] = {k: [] for k in codes}
    activation: list[float] = []
    for code in codes.values():  # one untimed run each: warm the page cache / pyc files
        time_cmd(code, env, tmp)
    for _ in range(reps):
        for name, code in codes.items():
            samples[name].append(time_cmd(code, env, tmp) * 1000.0)
        # In-process: with LlamaIndex already imported, `import aim_llama.auto` instruments at once
        # (settings, handler, hooks); the writer itself starts later, at the first record.
        out = subprocess.run([PY, "-c", ACTIVATION], env=env, cwd=tmp, check=True,
                             capture_output=True, text=True).stdout
        activation.append(float(out.split()[-1]))
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "reps": reps,
        "median_ms": med,
        "auto_import_ms": med["auto"] - med["pass"],
        "activation_ms": statistics.median(activation),
        "aim_not_imported": True,  # asserted inside the activation command
        "samples_ms": samples,
        "activation_samples_ms": activation,
    }


ACTIVATION = """
import sys, time
import llama_index.core
t0 = time.perf_counter()
import aim_llama.auto, aim_llama
dt = time.perf_counter() - t0
assert aim_llama.is_instrumented(), "not instrumented"
assert "aim" not in sys.modules, "aim imported on the application's import path"
print(dt * 1000.0)
"""


# -- writer: exit flush and burst --------------------------------------------------------------
def writer_load(mode: str, records: int, tmp: Path, keep: bool) -> dict[str, Any]:
    repo = tmp / f"repo-{mode}"
    out = tmp / f"out-{mode}.json"
    cmd = [PY, str(HERE / "writer_load.py"), mode, "--records", str(records), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp, env=clean_env(AIM_REPO=str(repo)), capture_output=True,
                          text=True, timeout=900)
    exited = time.time()
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"writer_load {mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    if mode == "flush":
        result["exit_flush_s"] = exited - result["queued_wall"]
    back = count_values(repo)
    stored = sum(n for name, n in back["by_name"].items() if name.startswith("b_") and name != "b_start")
    result["stored"] = stored
    result["dropped_records_metric"] = back["dropped_records"]
    result["runs"] = back["runs"]
    result["stderr_tail"] = proc.stderr[-800:] if proc.stderr.strip() else ""
    if mode == "flush":
        result["all_stored"] = stored == records
    else:
        dropped = back["dropped_records"] or 0
        # Every burst record is either stored or counted as dropped; the drop count may also
        # include a few non-burst records (e.g. the warning's own terminal line, teed to `logs`).
        result["unaccounted"] = records - stored - dropped
        result["drops_consistent"] = (0 <= records - stored <= dropped
                                      and dropped == result["dropped"])
    if not keep:
        shutil.rmtree(repo, ignore_errors=True)
    return result


# -- profiling (optional) ----------------------------------------------------------------------
def profile_summary(path: Path, queries: int, top: int = 12) -> list[str]:
    import pstats

    stats = pstats.Stats(str(path))
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if "aim_llama" in filename:
            rows.append((ct, tt, nc, f"{Path(filename).name}:{line}({func})"))
    rows.sort(reverse=True)
    return [f"{name}: cum {ct * 1e6 / queries:.1f} us/query, self {tt * 1e6 / queries:.1f} "
            f"us/query, {nc / queries:.1f} calls/query" for ct, tt, nc, name in rows[:top]]


# -- report ------------------------------------------------------------------------------------
def summarize(runs: dict[str, list[dict[str, Any]]], setup: dict[str, int], queries: int
              ) -> dict[str, dict[str, Any]]:
    base = statistics.median(r["ms_per_query"] for r in runs["uninstrumented"]) \
        if runs.get("uninstrumented") else None
    rows: dict[str, dict[str, Any]] = {}
    for config, reps in runs.items():
        ms = [r["ms_per_query"] for r in reps]
        row: dict[str, Any] = {
            "median_ms_per_query": statistics.median(ms),
            "min_ms_per_query": min(ms),
            "ms_per_query_reps": ms,
            "median_exit_ms": statistics.median(r["exit_ms"] for r in reps),
            "app_cpu_ms_per_query": statistics.median(r["app_cpu_ms_per_query"] for r in reps),
            "app_thread_cpu_ms_per_query": statistics.median(
                r["app_thread_cpu_ms_per_query"] for r in reps),
            "median_settle_s": statistics.median(r.get("settle_s", 0.0) for r in reps),
        }
        writer_cpu = [r["writer_cpu_ms_per_query"] for r in reps
                      if r.get("writer_cpu_ms_per_query") is not None]
        row["writer_cpu_ms_per_query"] = statistics.median(writer_cpu) if writer_cpu else None
        if base:
            row["ratio"] = row["median_ms_per_query"] / base
            if config != "uninstrumented":
                paired = [r["ms_per_query"] / u["ms_per_query"]
                          for r, u in zip(reps, runs["uninstrumented"], strict=False)]
                row["paired_ratio_median"] = statistics.median(paired)
        if "readback" in reps[0]:
            totals = [r["readback"]["values"] for r in reps]
            row["values_total_median"] = statistics.median(totals)
            row["values_setup"] = setup.get(config)
            if setup.get(config) is not None:
                row["values_per_query"] = (statistics.median(totals) - setup[config]) / queries
            row["readback_example"] = reps[-1]["readback"]
        rows[config] = row
    return rows


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['platform']}",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()),
        f"Load average at start / end: {m['loadavg_start'][0]:.2f} / {m['loadavg_end'][0]:.2f}",
        f"Workload: {report['args']['docs']} documents, MockLLM(max_tokens=16), "
        f"MockEmbedding(16), {report['args']['queries']} timed queries after "
        f"{report['args']['warmup']} warm-up, {report['args']['reps']} alternating repetitions",
        "Settings: aim-llama defaults (system metrics every 1 s, terminal logs captured, process "
        "writer) — the writer is started and drained before the clock starts (--no-settle to "
        "skip); AimCallback with its defaults except log_system_params=False. "
        "Values/query: metric points + texts read back from the repo, minus those of index build "
        "and warm-up, without `__system__*` and `logs`.",
        "",
        "| configuration | median ms/query | ratio | paired ratio | values/query | app-thread CPU "
        "ms/query | app-process CPU ms/query | writer-process CPU ms/query | exit after loop (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if not report["workload"]:
        lines = [*lines[:3], "(workload skipped)"]
    for config, row in report["workload"].items():
        ratio = f"{row['ratio']:.2f}×" if "ratio" in row else "—"
        paired = f"{row['paired_ratio_median']:.2f}×" if "paired_ratio_median" in row else "—"
        vpq = f"{row['values_per_query']:.1f}" if row.get("values_per_query") is not None else "—"
        wcpu = row.get("writer_cpu_ms_per_query")
        wtext = f"{wcpu:.2f}" if wcpu is not None else "—"
        lines.append(f"| {config} | {row['median_ms_per_query']:.2f} | {ratio} | {paired} | {vpq} | "
                     f"{row['app_thread_cpu_ms_per_query']:.2f} | {row['app_cpu_ms_per_query']:.2f} | "
                     f"{wtext} | {row['median_exit_ms']:.0f} |")
    settle = {c: r["median_settle_s"] for c, r in report["workload"].items() if r.get("median_settle_s")}
    if settle:
        lines += ["", "Writer start-up + drain before timing (median s): " +
                  ", ".join(f"{c} {v:.2f}" for c, v in settle.items())]
    lock = report.get("lockstep")
    if lock:
        from lockstep import table

        rounds = len(next(iter(lock.values()))["wall_ms"])
        lines += ["", f"Lockstep ({rounds} rounds; every configuration a live process, taking "
                  f"turns of {report['args']['lockstep_turn']} queries; ratios paired within "
                  "each round; `diag-noop`: aim-llama's handlers registered but returning at "
                  "once):", "", table(lock)]
    imp = report.get("import")
    extra = []
    if imp:
        extra.append(f"| `import aim_llama.auto` (vs `python -c pass`, median of {imp['reps']}) | "
                     f"{imp['auto_import_ms']:.1f} ms |")
        extra.append(f"| activation in-process: `import aim_llama.auto` after `llama_index.core` "
                     f"(settings + handler; Aim not imported) | {imp['activation_ms']:.1f} ms |")
    fl = report.get("flush")
    if fl:
        extra.append(f"| exit flush of {fl['records']:,} queued records (queued → process exit) | "
                     f"{fl['exit_flush_s']:.2f} s, {fl['stored']:,}/{fl['records']:,} in the repo |")
    bu = report.get("burst")
    if bu:
        growth = (max(bu["rss_peak"], bu["rss_after_submit"]) - bu["rss_before"]) / 2**20
        extra.append(f"| peak RSS growth, {bu['records']:,}-record burst (app process) | "
                     f"{growth:.1f} MB; {bu['dropped']:,} dropped (`dropped_records` read back: "
                     f"{bu['dropped_records_metric'] or 'none recorded'}), {bu['stored']:,} stored, drain "
                     f"{bu['drain_s']:.1f} s, consistent: {bu['drops_consistent']} |")
        if bu.get("writer_process_peak_rss"):
            before = bu.get("writer_process_rss_before")
            extra.append(f"| writer process RSS before the burst → peak | "
                         f"{(before or 0) / 2**20:.0f} MB → "
                         f"{bu['writer_process_peak_rss'] / 2**20:.0f} MB |")
        extra.append(f"| burst submit rate (app thread) | {bu['submit_per_s']:,.0f} records/s |")
    if extra:
        lines += ["", "| measurement | result |", "|---|---|", *extra]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=300, help="timed queries per repetition")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of every configuration")
    ap.add_argument("--warmup", type=int, default=20, help="untimed queries after the index build")
    ap.add_argument("--docs", type=int, default=50)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " +
                    ", ".join(CONFIGS + DIAGNOSTICS))
    ap.add_argument("--import-reps", type=int, default=20, help="fresh interpreters per import measurement")
    ap.add_argument("--flush-records", type=int, default=10_000)
    ap.add_argument("--burst-records", type=int, default=100_000)
    ap.add_argument("--skip", default="",
                    help="comma-separated parts to skip: workload,lockstep,import,flush,burst")
    ap.add_argument("--lockstep-rounds", type=int, default=60,
                    help="rounds of the lockstep comparison (lockstep.py); 0 skips it")
    ap.add_argument("--lockstep-turn", type=int, default=25, help="queries per lockstep turn")
    ap.add_argument("--no-settle", action="store_true",
                    help="time the loop without first waiting for aim-llama's writer to start/drain")
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile one aim-llama run and list aim_llama's own functions")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary Aim repos")
    args = ap.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS + DIAGNOSTICS:
            ap.error(f"unknown configuration {c!r}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    tmp = Path(tempfile.mkdtemp(prefix="aim-llama-bench-"))
    report: dict[str, Any] = {"args": vars(args), "machine": machine(), "started": time.time()}
    try:
        if "workload" not in skip:
            runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
            for rep in range(args.reps):
                order = configs[rep % len(configs):] + configs[: rep % len(configs)]  # rotate
                for config in order:
                    r = run_workload(config, args.queries, args, tmp, f"r{rep}")
                    runs[config].append(r)
                    print(f"rep {rep + 1}/{args.reps} {config:17s} {r['ms_per_query']:.3f} ms/query"
                          f"  exit {r['exit_ms']:.0f} ms", file=sys.stderr, flush=True)
            setup: dict[str, int] = {}
            for config in configs:  # values recorded by index build + warm-up alone
                if "readback" in runs[config][0]:
                    setup[config] = run_workload(config, 0, args, tmp, "setup")["readback"]["values"]
            report["workload"] = summarize(runs, setup, args.queries)
            report["workload_raw"] = runs
            if args.profile:
                prof = tmp / "aim-llama.prof"
                run_workload("aim-llama", args.queries, args, tmp, "profile", profile=prof)
                report["profile_aim_llama"] = profile_summary(prof, args.queries)
                attr = run_workload("aim-llama", args.queries, args, tmp, "attribute", attribute=True)
                report["attribution_aim_llama"] = {
                    "ms_per_query": attr["ms_per_query"],
                    "app_thread_cpu_ms_per_query": attr["app_thread_cpu_ms_per_query"],
                    "instrumentation_ms_per_query": attr.get("instrumentation_ms_per_query"),
                    "by_function": attr.get("attribution_us_per_query"),
                }
        if "lockstep" not in skip and args.lockstep_rounds > 0:
            from lockstep import run_lockstep

            print("lockstep ...", file=sys.stderr, flush=True)
            lock_configs = ["uninstrumented", *[c for c in configs if c in CONFIGS
                                                and c != "uninstrumented"], "diag-noop"]
            report["lockstep"] = run_lockstep(lock_configs, args.lockstep_rounds,
                                              args.lockstep_turn, tmp, args.docs)
        if "import" not in skip:
            print("import cost ...", file=sys.stderr, flush=True)
            report["import"] = import_cost(args.import_reps, tmp)
        if "flush" not in skip:
            print("exit flush ...", file=sys.stderr, flush=True)
            report["flush"] = writer_load("flush", args.flush_records, tmp, args.keep)
        if "burst" not in skip:
            print("burst ...", file=sys.stderr, flush=True)
            report["burst"] = writer_load("burst", args.burst_records, tmp, args.keep)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}", file=sys.stderr)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["finished"] = time.time()
    if "workload" not in report:
        report["workload"] = {}
    text = markdown(report)
    print(text)
    if report.get("profile_aim_llama"):
        print("\ncProfile of the aim-llama query loop (aim_llama functions, per query):")
        print("\n".join("  " + line for line in report["profile_aim_llama"]))
    attr = report.get("attribution_aim_llama")
    if attr:
        print(f"\nTime spent inside aim-llama's entry points on the app thread (one aim-llama run): "
              f"{attr['instrumentation_ms_per_query']:.3f} ms/query of "
              f"{attr['app_thread_cpu_ms_per_query']:.3f} ms/query app-thread CPU")
        for key, v in sorted(attr["by_function"].items(), key=lambda kv: -kv[1]["us_per_query"]):
            print(f"  {key}: {v['us_per_query']:.1f} us/query ({v['calls_per_query']:.1f} calls/query)")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(report["started"]))
    path = out_dir / f"overhead-{stamp}.json"
    report["markdown"] = text
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nJSON: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
