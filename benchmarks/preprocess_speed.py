"""Preprocessing speed: samunet_plan_and_preprocess against nnUNetv2_plan_and_preprocess on the same raw data.

The raw data set is copied once into a temporary samunet_raw / nnUNet_raw folder; every run then starts from
fresh, empty preprocessed and results folders, so nothing is reused between runs or tools. Each run is a separate
process and its wall-clock time includes interpreter start-up and imports.

- samunet runs its own command-line entry point (``samunet_plan_and_preprocess -d DATASET -np N``) from this
  checkout, with the three API stages (fingerprint, plan, preprocess) timed as they run.
- nnU-Net v2 runs ``nnUNetv2_plan_and_preprocess`` as an executable from its own virtual environment
  (``benchmarks/setup_nnunet_env.sh`` makes ``benchmarks/.venv-nnunet``); samunet never imports nnunetv2. Its stage
  times come from the moments its progress lines ("Fingerprint extraction...", ...) appear.

For nnU-Net, ``-npfp N`` is passed along with ``-np N`` by default: samunet's ``-np`` covers fingerprint extraction
as well, while nnU-Net would otherwise fingerprint with 8 processes (see ``--nnunet_npfp``).

Results go to ``benchmarks/results/preprocess_speed.{json,md}``. Run from the repository root:

    python benchmarks/preprocess_speed.py              # Hippocampus from ../shared/data, -np 2, 3 repeats
    python benchmarks/preprocess_speed.py --profile    # plus a cProfile of a single-process samunet run
    python benchmarks/preprocess_speed.py --skip_nnunet --repeats 1
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT / ".." / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
NNUNET_VENV_BIN = REPO_ROOT / "benchmarks" / ".venv-nnunet" / "bin" / "nnUNetv2_plan_and_preprocess"
NNUNET_MARKERS = (("fingerprint", "Fingerprint extraction..."), ("plan", "Experiment planning..."),
                  ("preprocess", "Preprocessing..."))
WORKER_FLAG = "--_samunet_worker"


# ----------------------------------------------------------------------------------------------------------------
# samunet worker: runs inside the timed child process
# ----------------------------------------------------------------------------------------------------------------

def _samunet_worker(timings_file: str, cli_args: list[str]) -> None:
    """Run samunet's plan-and-preprocess entry point with its API stages timed; write the timings as JSON."""
    t_start = time.perf_counter()
    import samunet
    import samunet.plan_and_preprocess as pap
    from samunet.cli import plan_and_preprocess_entry

    stages: dict[str, float] = {}
    preprocessed: dict = {}

    def timed(name, func):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                result = func(*args, **kwargs)
            finally:
                stages[name] = stages.get(name, 0.0) + time.perf_counter() - t
            if name == "preprocess":
                preprocessed.update({k: len(v) for k, v in result.items()})
            return result
        return wrapper

    # plan_and_preprocess looks these names up in its module at call time, so wrapping them times the real path
    for name, attr in (("fingerprint", "extract_fingerprint"), ("plan", "plan"), ("preprocess", "preprocess")):
        setattr(pap, attr, timed(name, getattr(pap, attr)))
    stages["startup_imports"] = time.perf_counter() - t_start
    plan_and_preprocess_entry(cli_args)
    result = {"stages_s": stages, "preprocessed_configurations": preprocessed,
              "samunet_module": str(Path(samunet.__file__).resolve().parent), "samunet_version": samunet.__version__}
    Path(timings_file).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------

def _dataset_folder(data: Path, dataset: str) -> Path:
    if (data / dataset).is_dir():
        return data / dataset
    if dataset.isdigit():
        found = sorted(p for p in data.glob(f"Dataset{int(dataset):03d}_*") if p.is_dir())
        if len(found) == 1:
            return found[0]
    sys.exit(f"error: data set '{dataset}' not found in {data} (pass --data and/or --dataset)")


def _find_nnunet(explicit: str | None) -> tuple[Path | None, str]:
    if explicit:
        p = Path(explicit)
        if p.is_dir():
            p = p / "nnUNetv2_plan_and_preprocess"
        return (p, "--nnunet_bin") if p.is_file() else (None, f"--nnunet_bin {explicit}: no such file")
    if NNUNET_VENV_BIN.is_file():
        return NNUNET_VENV_BIN, "benchmarks/.venv-nnunet"
    found = shutil.which("nnUNetv2_plan_and_preprocess")
    if found:
        return Path(found), "PATH"
    return None, ("nnUNetv2_plan_and_preprocess not found: not given with --nnunet_bin, no benchmarks/.venv-nnunet "
                  "(create it with benchmarks/setup_nnunet_env.sh) and not on PATH")


def _nnunet_version(binary: Path) -> str:
    """The nnunetv2 version, asked of the interpreter named in the executable's first line."""
    try:
        first = binary.open("r", errors="replace").readline().strip()
        python = first[2:].strip().split()[0] if first.startswith("#!") else str(binary.parent / "python")
        out = subprocess.run([python, "-c", "from importlib.metadata import version; print(version('nnunetv2'))"],
                             capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or "unknown"
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def _display_path(p: Path) -> str:
    """A path for the results files: relative to the repository when inside it, otherwise just its name."""
    try:
        return str(Path(p).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return Path(p).name


def _folder_stats(folder: Path) -> dict:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {"files": len(files), "mb": round(sum(p.stat().st_size for p in files) / 1e6, 1)}


def _count_cases(config_folder: Path) -> int:
    """Preprocessed training cases in one configuration folder (one image file per case)."""
    if not config_folder.is_dir():
        return 0
    names = [p.name for p in config_folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return sum(1 for n in names if re.search(r"\.(npy|npz|b2nd)$", n) and "_seg" not in n)


def _machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024 ** 2, 1)
    except (OSError, ValueError):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores_usable": usable, "cores_total": os.cpu_count(), "memory_gb": mem_gb,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def _cpu_busy_fraction(seconds: float = 2.0) -> float | None:
    """Share of all cores busy over ``seconds`` while this benchmark itself is idle: other load on the machine."""
    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    dt = total1 - total0
    return round(1.0 - (idle1 - idle0) / dt, 2) if dt > 0 else None


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "samunet"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return f"{head}{' (samunet/ modified)' if dirty else ''}" if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _package_version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001 - any failure just means "unknown"
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------------------------

def run_samunet(raw: Path, work: Path, dataset_name: str, num_processes: int, log_file: Path) -> dict:
    pre, res = work / "preprocessed", work / "results"
    pre.mkdir(parents=True)
    res.mkdir(parents=True)
    timings = work / "timings.json"
    env = dict(os.environ, samunet_raw=str(raw), samunet_preprocessed=str(pre), samunet_results=str(res))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cli_args = ["-d", dataset_name, "-np", str(num_processes)]
    cmd = [sys.executable, str(Path(__file__).resolve()), WORKER_FLAG, str(timings), *cli_args]
    with open(log_file, "w") as log:
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
        wall = time.perf_counter() - t
    out = {"tool": "samunet", "command": "samunet_plan_and_preprocess " + " ".join(cli_args),
           "returncode": proc.returncode, "wall_s": round(wall, 2), "progress": progress_bars(log_file)}
    if proc.returncode != 0 or not timings.is_file():
        out["error"] = _tail(log_file)
        return out
    info = json.loads(timings.read_text())
    if Path(info["samunet_module"]) != (REPO_ROOT / "samunet").resolve():
        out["warning"] = "samunet was imported from outside this checkout"
    stages = info["stages_s"]
    out["imports_s"] = round(stages.pop("startup_imports"), 2)
    # everything outside the three stages: interpreter start, imports, argument parsing, exit
    stages = {"startup_imports": max(0.0, wall - sum(stages.values())), **stages}
    out["stages_s"] = {k: round(v, 2) for k, v in stages.items()}
    out["samunet_version"] = info["samunet_version"]
    plans = json.loads(next(pre.glob("*/samunetPlans.json")).read_text())
    out["configurations_planned"] = list(plans["configurations"])
    out["configurations_preprocessed"] = list(info["preprocessed_configurations"])
    ds = pre / dataset_name
    out["cases_per_configuration"] = {
        c: _count_cases(ds / plans["configurations"][c]["data_identifier"]) for c in out["configurations_preprocessed"]}
    out["output"] = _folder_stats(ds)
    return out


def run_nnunet(binary: Path, raw: Path, work: Path, dataset_id: int, configs: list[str] | None,
               num_processes: int, npfp: int | None, log_file: Path) -> dict:
    pre, res = work / "preprocessed", work / "results"
    pre.mkdir(parents=True)
    res.mkdir(parents=True)
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(res),
               PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # nnU-Net runs from its own environment only
    args = ["-d", str(dataset_id)] + (["-c", *configs] if configs else []) + ["-np", str(num_processes)]
    if npfp is not None:
        args += ["-npfp", str(npfp)]
    marks: dict[str, float] = {}
    with open(log_file, "w") as log:
        t = time.perf_counter()
        proc = subprocess.Popen([str(binary), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=work, text=True, errors="replace", bufsize=1)
        for line in proc.stdout:
            now = time.perf_counter() - t
            log.write(line)
            for stage, marker in NNUNET_MARKERS:
                if stage not in marks and line.strip().startswith(marker):
                    marks[stage] = now
        proc.wait()
        wall = time.perf_counter() - t
    out = {"tool": "nnU-Net v2", "command": "nnUNetv2_plan_and_preprocess " + " ".join(args),
           "returncode": proc.returncode, "wall_s": round(wall, 2), "progress": progress_bars(log_file)}
    if proc.returncode != 0:
        out["error"] = _tail(log_file)
        return out
    if all(s in marks for s, _ in NNUNET_MARKERS):
        out["stages_s"] = {"startup_imports": round(marks["fingerprint"], 2),
                           "fingerprint": round(marks["plan"] - marks["fingerprint"], 2),
                           "plan": round(marks["preprocess"] - marks["plan"], 2),
                           "preprocess": round(wall - marks["preprocess"], 2)}
    ds = next((p for p in pre.iterdir() if p.is_dir()), None)
    if ds is not None:
        plans_file = ds / "nnUNetPlans.json"
        if plans_file.is_file():
            plans = json.loads(plans_file.read_text())
            out["configurations_planned"] = list(plans["configurations"])
        folders = sorted(p for p in ds.iterdir() if p.is_dir() and p.name.startswith("nnUNetPlans_"))
        out["cases_per_configuration"] = {p.name[len("nnUNetPlans_"):]: _count_cases(p) for p in folders}
        out["configurations_preprocessed"] = list(out["cases_per_configuration"])
        out["output"] = _folder_stats(ds)
    return out


_TQDM_RE = re.compile(r"^(?P<desc>.*?):\s+\d+%\|.*?\|\s*(?P<n>\d+)/(?P<total>\d+) \[(?P<t>[\d:]+)<")


def _seconds(clock: str) -> int:
    s = 0
    for part in clock.split(":"):
        s = s * 60 + int(part)
    return s


def progress_bars(log_file: Path) -> list[dict]:
    """From tqdm lines in a log: per progress bar, the elapsed seconds (whole seconds, as tqdm prints them) when
    the first case was finished and when the last one was. The first shows the start-up cost of worker processes."""
    bars: list[dict] = []
    current: dict[str, dict] = {}  # the latest bar per description; a count going down starts a new bar
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return []
    for piece in re.split(r"[\r\n]+", text):
        m = _TQDM_RE.match(piece.strip())
        if not m or int(m["n"]) == 0:
            continue
        n, desc = int(m["n"]), m["desc"].strip()
        b = current.get(desc)
        if b is None or n < b["_n"]:
            b = current[desc] = {"bar": desc, "cases": int(m["total"]), "first_case_done_s": _seconds(m["t"])}
            bars.append(b)
        b["_n"] = n
        b["last_case_done_s"] = _seconds(m["t"])
    for b in bars:
        del b["_n"]
    return bars


def _tail(log_file: Path, n: int = 25) -> str:
    try:
        return "\n".join(log_file.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def profile_samunet(raw: Path, work: Path, dataset_name: str, out_file: Path, top: int = 25) -> dict | None:
    """cProfile one single-process samunet plan-and-preprocess (worker processes are invisible to cProfile).

    Writes the full tables to ``out_file`` and returns the top entries for the report."""
    import pstats

    pre, res = work / "preprocessed", work / "results"
    pre.mkdir(parents=True)
    res.mkdir(parents=True)
    stats_file = work / "profile.pstats"
    code = ("import cProfile, samunet.plan_and_preprocess as pap\n"
            "pr = cProfile.Profile()\n"
            f"pr.runcall(pap.plan_and_preprocess, {dataset_name!r}, num_processes=1)\n"
            f"pr.dump_stats({str(stats_file)!r})\n")
    env = dict(os.environ, samunet_raw=str(raw), samunet_preprocessed=str(pre), samunet_results=str(res))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0 or not stats_file.is_file():
        print(f"profiling failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    stats = pstats.Stats(str(stats_file))
    total = stats.total_tt

    def entry(key, value):
        filename, line, func = key
        _, ncalls, tottime, cumtime, _ = value
        return {"function": f"{Path(filename).name}:{line}({func})" if line else func, "ncalls": ncalls,
                "tottime_s": round(tottime, 2), "cumtime_s": round(cumtime, 2)}

    items = list(stats.stats.items())
    by_tottime = [entry(k, v) for k, v in sorted(items, key=lambda kv: -kv[1][2])[:top]]
    own = [(k, v) for k, v in items if f"{os.sep}samunet{os.sep}" in k[0]]
    samunet_cum = [entry(k, v) for k, v in sorted(own, key=lambda kv: -kv[1][3])[:top]]
    lines = [f"# cProfile of samunet plan-and-preprocess on {dataset_name}: one process (-np 1; worker processes",
             "# of a -np 2 run are invisible to cProfile), fresh folders, after imports.",
             f"# profiled time {total:.1f} s (wall {wall:.1f} s with start-up and profiler overhead)", ""]
    for title, rows in (("top functions by own time (tottime)", by_tottime),
                        ("samunet functions by cumulative time (cumtime)", samunet_cum)):
        lines += [f"## {title}", "", f"{'tottime s':>10} {'cumtime s':>10} {'ncalls':>8}  function"]
        lines += [f"{r['tottime_s']:>10.2f} {r['cumtime_s']:>10.2f} {r['ncalls']:>8}  {r['function']}" for r in rows]
        lines.append("")
    out_file.write_text("\n".join(lines))
    return {"profiled_s": round(total, 2), "by_tottime": by_tottime, "samunet_by_cumtime": samunet_cum}


# ----------------------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------------------

def _summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("returncode") == 0]
    if not ok:
        return {"wall_s": None, "all_wall_s": [r["wall_s"] for r in runs], "failed": True}
    walls = [r["wall_s"] for r in ok]
    stages = {}
    for key in ok[0].get("stages_s", {}):
        values = [r["stages_s"][key] for r in ok if key in r.get("stages_s", {})]
        stages[key] = round(statistics.median(values), 2)
    return {"wall_s": round(statistics.median(walls), 2), "all_wall_s": walls, "stages_s": stages,
            "failed": len(ok) < len(runs)}


def _configs_label(entry: dict) -> str:
    pre = entry.get("configurations_preprocessed") or []
    planned = entry.get("configurations_planned") or []
    if entry["tool"] == "samunet":
        shared = [c for c in planned if c not in pre]
        return "+".join(pre) + (f" (+{'+'.join(shared)}, same data)" if shared else "")
    return "+".join(pre) if pre else "?"


def build_table(results: list[dict]) -> list[list[str]]:
    base = next((r["summary"]["wall_s"] for r in results if r["tool"] == "samunet"), None)
    rows = [["tool", "configurations", "wall time s", "ratio nnU-Net/samunet",
             "startup+imports s", "fingerprint s", "plan s", "preprocess s"]]
    for r in results:
        s = r["summary"]
        wall = s["wall_s"]
        if r["tool"] == "samunet":
            ratio = "1.00 (reference)" if wall else "-"
        else:
            ratio = f"{wall / base:.2f}" if wall and base else "-"
        st = s.get("stages_s", {})
        rows.append([r["tool"] + (f" ({r['variant']})" if r.get("variant") else ""), r.get("configurations", "?"),
                     f"{wall:.1f}" if wall else "failed", ratio,
                     *(f"{st[k]:.1f}" if k in st else "-" for k in ("startup_imports", "fingerprint", "plan",
                                                                    "preprocess"))])
    return rows


def _format_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _format_md(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def write_markdown(report: dict, rows: list[list[str]], path: Path, profile_file: Path | None) -> None:
    m = report["machine"]
    lines = [
        "# Preprocessing speed: samunet vs nnU-Net v2",
        "",
        f"Data set: {report['dataset']} ({report['num_cases']} training cases), `-np {report['num_processes']}`, "
        f"{report['repeats']} repeat(s) per tool (median shown). Wall time is for the whole command in its own "
        "process (interpreter start-up and imports included), starting from empty preprocessed folders every time.",
        "",
        _format_md(rows),
        "",
        "Ratio > 1: nnU-Net took longer than samunet. nnU-Net stage times are taken from when its progress lines "
        "appear; samunet's from timers around its API stages; `startup+imports` is the time before the first "
        "stage starts. samunet's `preprocess` and nnU-Net's include copying the label maps to `gt_segmentations`.",
        "",
        "## Runs",
        "",
    ]
    sam_walls = next(([x["wall_s"] if x.get("returncode") == 0 else None for x in r["runs"]]
                      for r in report["results"] if r["tool"] == "samunet"), [])
    for r in report["results"]:
        lines.append(f"- **{r['tool']}{' (' + r['variant'] + ')' if r.get('variant') else ''}**: "
                     f"`{r['command']}`; wall times {r['summary']['all_wall_s']} s")
        first = next((x for x in r["runs"] if x.get("returncode") == 0), None)
        if first:
            lines.append(f"  - planned {first.get('configurations_planned')}, preprocessed "
                         f"{first.get('cases_per_configuration')} (cases per configuration), output "
                         f"{first.get('output', {}).get('files')} files, {first.get('output', {}).get('mb')} MB")
            bars = "; ".join(f"{b['bar'].strip()}: first case done after {b['first_case_done_s']} s, last after "
                             f"{b['last_case_done_s']} s" for b in first.get("progress", []))
            if bars:
                lines.append(f"  - progress bars (first run, whole seconds): {bars}")
        if r["tool"] != "samunet" and sam_walls:
            ratios = [round(x["wall_s"] / b, 2) if x.get("returncode") == 0 and b else None
                      for x, b in zip(r["runs"], sam_walls)]
            lines.append(f"  - ratio to the samunet run of the same repeat: {ratios}")
        loads = [x.get("other_cpu_load_before") for x in r["runs"]]
        if any(v is not None for v in loads):
            lines.append(f"  - share of the CPUs busy with other work in the 2 s before each run: {loads}")
        for x in r["runs"]:
            if x.get("error"):
                lines.append(f"  - a run failed (exit code {x['returncode']}); last lines:\n\n```\n{x['error']}\n```")
    if report.get("nnunet_unavailable"):
        lines.append(f"- **nnU-Net v2**: not run: {report['nnunet_unavailable']}")
    lines += [
        "",
        "## Fairness notes",
        "",
        "- samunet plans 2d and, for 3D data, 2.5d; both use the same preprocessed slices, so one preprocessing pass "
        "serves both. The comparable nnU-Net run is `-c 2d`; nnU-Net's default run also preprocesses 3d_fullres "
        "(and 3d_lowres where the data need it), which samunet does not have.",
        (f"- nnU-Net got `-npfp {report['nnunet_npfp']}` for fingerprint extraction (its default would be 8), so "
         f"both tools use {report['num_processes']} processes in every stage." if report["nnunet_npfp"] is not None
         else "- nnU-Net fingerprinted with its default number of processes (8)."),
        "- Both read the same copy of the raw data (page cache warm from copying it); every run writes into fresh "
        "folders, so no fingerprint, plan or preprocessed case is reused.",
        "- Runs of the tools are interleaved when repeated, so that changing load on the machine affects all of "
        "them alike; the load seen before each run is listed above.",
        "",
        "## Set-up",
        "",
        f"- Command: `{report['command']}` (from the repository root)",
        f"- Date: {report['date']}",
        f"- Machine: {m['cpu']}, {m['cores_usable']} usable cores ({m['cores_total']} in total), "
        f"{m['memory_gb']} GB RAM, {m['os']}",
        f"- samunet {report['versions']['samunet']} at commit {report['versions']['samunet_commit']}, Python "
        f"{m['python']}, torch {report['versions']['torch']}, SimpleITK {report['versions']['SimpleITK']}",
    ]
    if report.get("nnunet_source"):
        lines.append(f"- nnunetv2 {report['versions'].get('nnunetv2', 'unknown')} (executable found via "
                     f"{report['nnunet_source']}; run from its own virtual environment)")
    else:
        lines.append(f"- nnunetv2: not run ({report['nnunet_unavailable']})")
    prof = report.get("profile")
    if prof:
        lines += ["", "## Where samunet spends its time (cProfile, -np 1)", "",
                  f"Single-process run, {prof['profiled_s']:.1f} s profiled (imports excluded); full tables in "
                  f"`{_display_path(profile_file)}`.", "",
                  "| samunet function | cumulative s | calls |", "|---|---|---|"]
        lines += [f"| `{e['function']}` | {e['cumtime_s']:.2f} | {e['ncalls']} |"
                  for e in prof["samunet_by_cumtime"][:12]]
        lines += ["", "| function (own time) | own s | calls |", "|---|---|---|"]
        lines += [f"| `{e['function']}` | {e['tottime_s']:.2f} | {e['ncalls']} |" for e in prof["by_tottime"][:10]]
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="folder holding raw data sets in nnU-Net v2 format (default: ../shared/data beside the "
                        "repository root); never written to")
    p.add_argument("--dataset", default="Dataset004_Hippocampus", help="data set name or id (default: %(default)s)")
    p.add_argument("-np", type=int, default=2, help="processes for every stage of both tools (default 2)")
    p.add_argument("--nnunet_bin", default=None,
                   help="nnUNetv2_plan_and_preprocess executable (or its folder); default: benchmarks/.venv-nnunet, "
                        "then PATH")
    p.add_argument("--nnunet_configs", nargs="+", default=["2d", "default"],
                   help="nnU-Net runs to time: '2d' (-c 2d, comparable to samunet), 'default' (no -c: 2d, "
                        "3d_fullres, 3d_lowres), or any configuration name (default: 2d default)")
    p.add_argument("--nnunet_npfp", type=int, default=None,
                   help="nnU-Net fingerprint processes (-npfp); default: the same as -np. 0: leave nnU-Net's default")
    p.add_argument("--skip_nnunet", action="store_true", help="time samunet only")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per tool, interleaved; the median is reported (default 3)")
    p.add_argument("--profile", action="store_true",
                   help="also cProfile a single-process samunet run into <out>/preprocess_speed_profile.txt")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default: benchmarks/results)")
    p.add_argument("--workdir", default=None,
                   help="scratch folder for the raw copy and outputs (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    a = p.parse_args(argv)

    src = _dataset_folder(Path(a.data), a.dataset)
    dataset_name = src.name
    dataset_id = int(re.match(r"Dataset(\d+)_", dataset_name).group(1))
    npfp = a.np if a.nnunet_npfp is None else (a.nnunet_npfp or None)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    nnunet_bin, nnunet_source = (None, "skipped (--skip_nnunet)") if a.skip_nnunet else _find_nnunet(a.nnunet_bin)
    if nnunet_bin is None:
        print(f"NOTE: nnU-Net will not be run: {nnunet_source}. Reporting samunet only.", file=sys.stderr)

    scratch = Path(tempfile.mkdtemp(prefix="samunet_bench_", dir=a.workdir))
    try:
        raw = scratch / "raw"
        raw.mkdir()
        print(f"copying {dataset_name} to a scratch folder ...", file=sys.stderr)
        shutil.copytree(src, raw / dataset_name)
        info = json.loads((raw / dataset_name / "dataset.json").read_text())
        n_cases = len(list((raw / dataset_name / "labelsTr").glob("*" + info["file_ending"])))

        jobs = [("samunet", None)]
        if nnunet_bin is not None:
            for c in a.nnunet_configs:
                jobs.append(("nnunet", c))
        runs: dict[tuple, list[dict]] = {j: [] for j in jobs}
        for rep in range(a.repeats):
            for tool, variant in jobs:
                tag = f"{tool}_{variant or 'all'}_{rep}"
                work = scratch / tag
                work.mkdir()
                label = "samunet" if tool == "samunet" else f"nnU-Net ({variant})"
                print(f"[{rep + 1}/{a.repeats}] {label} ...", file=sys.stderr, flush=True)
                busy_before = _cpu_busy_fraction()
                if tool == "samunet":
                    r = run_samunet(raw, work, dataset_name, a.np, scratch / f"{tag}.log")
                else:
                    configs = None if variant == "default" else [variant]
                    r = run_nnunet(nnunet_bin, raw, work, dataset_id, configs, a.np, npfp, scratch / f"{tag}.log")
                print(f"    {r['wall_s']:.1f} s" + ("" if r["returncode"] == 0 else f"  FAILED (exit "
                      f"{r['returncode']})"), file=sys.stderr, flush=True)
                r["other_cpu_load_before"] = busy_before
                runs[(tool, variant)].append(r)
                shutil.rmtree(work, ignore_errors=True)  # keep disk use flat; logs stay beside it

        results = []
        for (tool, variant), rs in runs.items():
            entry = {"tool": "samunet" if tool == "samunet" else "nnU-Net v2",
                     "variant": None if tool == "samunet" else ("-c " + variant if variant != "default"
                                                               else "default, no -c"),
                     "command": rs[0]["command"], "runs": rs}
            first = next((x for x in rs if x.get("returncode") == 0), rs[0])
            entry["configurations_planned"] = first.get("configurations_planned")
            entry["configurations_preprocessed"] = first.get("configurations_preprocessed")
            entry["configurations"] = _configs_label(entry) if first.get("returncode") == 0 else "?"
            entry["summary"] = _summarise(rs)
            results.append(entry)

        profile_file, profile = None, None
        if a.profile:
            print("profiling samunet (-np 1) ...", file=sys.stderr, flush=True)
            work = scratch / "profile"
            work.mkdir()
            profile_file = out_dir / "preprocess_speed_profile.txt"
            profile = profile_samunet(raw, work, dataset_name, profile_file)
            if profile is None:
                profile_file = None

        versions = {"samunet": _package_version("samunet"), "samunet_commit": _git_commit(),
                    "torch": _package_version("torch"), "SimpleITK": _package_version("SimpleITK")}
        sam = next(r for r in results if r["tool"] == "samunet")
        first = next((x for x in sam["runs"] if "samunet_version" in x), None)
        if first:
            versions["samunet"] = first["samunet_version"]
        if nnunet_bin is not None:
            versions["nnunetv2"] = _nnunet_version(nnunet_bin)
        command = "python " + " ".join(shlex.quote(x) for x in
                                       [_display_path(Path(__file__))] + list(sys.argv[1:] if argv is None else argv))
        report = {
            "benchmark": "preprocess_speed",
            "command": command,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": _machine(),
            "versions": versions,
            "dataset": dataset_name,
            "num_cases": n_cases,
            "num_processes": a.np,
            "nnunet_npfp": npfp,
            "repeats": a.repeats,
            "nnunet_source": nnunet_source if nnunet_bin is not None else None,
            "nnunet_unavailable": None if nnunet_bin is not None else nnunet_source,
            "results": results,
            "profile": profile,
        }
        rows = build_table(results)
        print()
        print(_format_text(rows))
        if nnunet_bin is None:
            print(f"\nnnU-Net was not run: {nnunet_source}")
        (out_dir / "preprocess_speed.json").write_text(json.dumps(report, indent=2) + "\n")
        write_markdown(report, rows, out_dir / "preprocess_speed.md", profile_file)
        print(f"\nwritten: {_display_path(out_dir / 'preprocess_speed.json')}, "
              f"{_display_path(out_dir / 'preprocess_speed.md')}")
        failed = any(r["summary"].get("failed") for r in results)
        return 1 if failed else 0
    finally:
        if a.keep:
            print(f"scratch folder kept: {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == WORKER_FLAG:
        _samunet_worker(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(main())
