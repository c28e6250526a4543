"""Mutation testing of the core with mutmut: how many one-token changes to the code the tests catch.

mutmut (https://github.com/boxed/mutmut) copies the sources into ``mutants/``, makes every small
change it knows (operators, constants, comparisons, arguments, strings, ...) behind a switch, runs
the test suite once to learn which tests reach which function, and then, per mutant, the tests that
reach it. A mutant is *killed* when one of them fails, *survived* when all pass.

This script runs mutmut in a scratch copy of the working tree (so the checkout stays untouched and
a run can go on while you work), then writes ``benchmarks/results/mutation.{md,json}``: per module
killed / survived / equivalent / not reached, the score ``killed / (killed + survived)`` with the
mutants judged equivalent left out, and each survivor with its diff and, from
``benchmarks/mutation_notes.toml``, the reason it is equivalent.

Run (from the repository root; ``scripts/mutation`` installs mutmut first)::

    scripts/mutation                                   # every module below (hours on 2 cores)
    scripts/mutation --modules src/leantune/data/encode.py
    scripts/mutation --report-only                     # re-render from the last run's copy

``--scratch NAME`` keeps a run in a copy of its own (``.mutation/NAME``), e.g. one per module
group; the report takes each module from the copy with its newest results. ``--keep`` reuses the
scratch copy of an earlier run, brought up to date with the checkout: mutmut
then tests the mutants it has no result for and those of functions whose code changed.
``--recheck survived`` (with ``--keep``) re-tests the survivors of the last run (of ``--modules``)
against the current tests, e.g. after adding tests for them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import tomllib

import benchlib

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "mutation"
NOTES = ROOT / "benchmarks" / "mutation_notes.toml"
SCRATCH = ROOT / ".mutation"

# The core, and the tests that guard it. Only in-process tests count: mutmut learns which tests
# reach a function by tracing this process, so a torchrun or CLI subprocess reaches nothing (the
# collectives run in-process on torch's threaded process group: tests/threaded.py).
MODULES = {
    "src/leantune/optim/*": [
        "tests/unit/test_optim_oracles.py",
        "tests/unit/test_optim_engine.py",
        "tests/unit/test_rounding.py",
        "tests/unit/test_segments.py",
        "tests/reliability/test_numerical_faults.py",
        "tests/unit/test_collectives_threads.py",
        "tests/unit/test_optim_units.py",
        "tests/unit/test_optim_mutants_in_backward.py",
        "tests/unit/test_optim_mutants_factory.py",
        "tests/unit/test_optim_mutants_precision.py",
        "tests/unit/test_optim_mutants_adalomo.py",
        "tests/unit/test_optim_mutants_engine.py",
        "tests/unit/test_competitors.py",
        "tests/unit/test_micro_batches.py",
        "tests/unit/test_tensor_parallel.py",  # AdaLomo's statistics over DTensor meshes
    ],
    "src/leantune/data/encode.py": [
        "tests/unit/test_data.py",
        "tests/unit/test_encode.py",
        "tests/unit/test_preference.py",
    ],
    # (not test_security.py: it reads the source text, which holds every mutant)
    "src/leantune/checkpoint.py": [
        "tests/reliability/test_checkpoints.py",
        "tests/reliability/test_checkpoint_units.py",
    ],
    "src/leantune/distributed/collectives.py": [
        "tests/unit/test_segments.py",
        "tests/unit/test_dist_runtime.py",
        "tests/unit/test_collectives_threads.py",
        "tests/unit/test_tensor_parallel.py",  # MeshCollectives: tensor parallel on threaded ranks
        "tests/unit/test_collectives_groups.py",
    ],
    "src/leantune/estimate.py": [
        "tests/unit/test_estimate.py",
        "tests/unit/test_estimate_model.py",
        "tests/unit/test_estimate_parallel.py",
        "tests/unit/test_estimate_mutants.py",
        "tests/unit/test_footprint.py",
    ],
}
PYTEST_ARGS = ["-p", "no:cacheprovider", "-p", "no:xdist", "-m", "not slow and not distributed", "-q"]


def _copy_tree(dest: Path) -> None:
    """The working tree as it is (uncommitted changes included), without venvs and outputs."""
    if dest.exists():
        shutil.rmtree(dest)
    ignore = shutil.ignore_patterns(
        ".venv", ".git", ".mutation", "mutants", "runs", "__pycache__", "*.egg-info"
    )
    shutil.copytree(ROOT, dest, ignore=ignore)


def _sync_tree(dest: Path) -> None:
    """Bring an earlier scratch copy up to date with the checkout's last commit (not the working
    tree: half-written work stays out): mutmut then re-mutates the functions whose code changed.

    Its ``pyproject.toml`` (the mutmut section) stays: mutmut discards every result when the test
    selection changes. A test file added to :data:`MODULES` since is pulled into the selection
    through the first selected test file of its module instead (its public names, those the host
    does not define, copied into the host's namespace, where pytest collects them).
    """
    archive = subprocess.run(["git", "archive", "HEAD", "src", "tests", "benchmarks"], cwd=ROOT,
                             capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    selected = set(_selection(dest))
    for tests in MODULES.values():
        host = next((t for t in tests if t in selected), None)
        added = [t for t in tests if t not in selected]
        if host is None or not added:
            continue
        lines = ["", "# added by benchmarks/mutation.py --keep: test files selected since this copy was made"]
        for i, test in enumerate(added):
            dotted = test.removesuffix(".py").replace("/", ".")
            lines += [
                f"import {dotted} as _added_{i}  # noqa: E402",
                f"globals().update({{k: v for k, v in vars(_added_{i}).items()"
                " if not k.startswith('_') and k not in globals()})",
            ]
        with open(dest / host, "a") as f:
            f.write("\n".join(lines) + "\n")


def _selection(work: Path) -> list[str]:
    """The test files of the scratch copy's mutmut section."""
    section = tomllib.loads((work / "pyproject.toml").read_text())["tool"]["mutmut"]
    return list(section["pytest_add_cli_args_test_selection"])


def _write_config(work: Path, modules: list[str]) -> None:
    tests = sorted({t for m in modules for t in MODULES[m]})
    lines = [
        "",
        "[tool.mutmut]",
        'source_paths = ["src/leantune"]',
        f"only_mutate = {json.dumps(modules)}",
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
        "pytest_add_cli_args = " + json.dumps(PYTEST_ARGS),
        'also_copy = ["benchmarks"]',
        # torch is not fork-safe once it has run: fork the workers from a clean server process
        'process_isolation = "forkserver"',
    ]
    pyproject = work / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + "\n".join(lines) + "\n")


def _module_of(mutant: str) -> str:
    """``leantune.optim.engine.xǁFusedOptimizerǁ_apply__mutmut_3`` -> ``src/leantune/optim/engine.py``."""
    dotted = mutant.split(".x", 1)[0] if ".xǁ" in mutant or ".x_" in mutant else mutant.rsplit(".", 1)[0]
    return "src/" + dotted.replace(".", "/") + ".py"


def _function_of(mutant: str) -> str:
    name = mutant.rsplit(".", 1)[1].split("__mutmut_")[0]
    return name.removeprefix("x").replace("ǁ", ".").strip(".").removeprefix("_") if "ǁ" in name else name[2:]


# Run inside the scratch copy by its venv's python: mutmut's own reading of its results (one
# process for all mutants; ``mutmut show`` per survivor would start one per mutant).
_COLLECT = """
import json
from mutmut.__main__ import SourceFileMutationData, get_diff_for_mutant, status_by_exit_code
from mutmut.__main__ import walk_mutatable_files

rows = []
for path in walk_mutatable_files():
    data = SourceFileMutationData(path=path)
    data.load()
    for name, code in data.exit_code_by_key.items():
        row = {"mutant": name, "status": status_by_exit_code[code]}
        if row["status"] == "survived":
            diff = get_diff_for_mutant(name, path=path).splitlines()
            row["diff"] = "\\n".join(x for x in diff if x[:1] in "+-" and not x.startswith(("+++", "---")))
        rows.append(row)
print(json.dumps(rows))
"""


def collect(work: Path) -> list[dict[str, Any]]:
    proc = subprocess.run([sys.executable, "-c", _COLLECT], cwd=work, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"reading mutmut's results failed:\n{proc.stderr[-3000:]}")
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    for row in rows:
        row["module"], row["function"] = _module_of(row["mutant"]), _function_of(row["mutant"])
    return rows


# notes tables -> the status a survivor they describe gets
NOTE_STATUS = {"equivalent": "equivalent", "unreachable": "unreachable here"}


def collect_all() -> list[dict[str, Any]]:
    """The rows of every scratch copy (``--scratch``); a module mutated in several copies is taken
    from the copy whose results for it are newest."""
    best: dict[str, tuple[float, list[dict[str, Any]]]] = {}
    for work in sorted(p for p in SCRATCH.iterdir() if (p / "mutants").is_dir()):
        for module, rows in _by_module(collect(work)).items():
            meta = work / "mutants" / (module + ".meta")
            stamp = meta.stat().st_mtime if meta.is_file() else 0.0
            if module not in best or stamp > best[module][0]:
                best[module] = (stamp, [{**r, "scratch": work.name} for r in rows])
    return [r for _, rows in sorted(best.items()) for r in rows[1]]


def carry_over(
    rows: list[dict[str, Any]], patterns: list[str], previous_json: Path
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The rows of the modules no scratch copy has results for, taken from the report being
    replaced (``previous_json``), each marked with the code it was measured on (``measured_on``):
    a run of some modules re-renders the whole report without dropping the others.

    Returns those rows and what they came from (the previous report's source and date), or
    ``([], None)`` when nothing is carried."""
    if not previous_json.is_file():
        return [], None
    old = json.loads(previous_json.read_text())
    fresh = {r["module"] for r in rows}
    src = old.get("source") or {}
    stamp = f"{src.get('git_commit') or src.get('digest', 'unknown')} ({old.get('date', '?')[:10]})"
    carried = [
        {**r, "measured_on": r.get("measured_on", stamp)}
        for r in old.get("rows", [])
        if r["module"] not in fresh and any(fnmatch.fnmatch(r["module"], m) for m in patterns)
    ]
    return carried, ({"source": src, "date": old.get("date")} if carried else None)


def _by_module(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["module"], []).append(r)
    return out


def load_notes() -> dict[str, dict[str, str]]:
    """``[[equivalent]]`` entries (no test could tell the mutant apart) and ``[[unreachable]]`` ones
    (a test could, but only on hardware or in processes this selection does not have: a GPU, NCCL,
    several real processes): ``mutant`` (its name), ``diff`` (a line of it, so that a stale name
    after a code change does not silently excuse another mutant) and ``reason``."""
    if not NOTES.is_file():
        return {}
    data = tomllib.loads(NOTES.read_text())
    return {e["mutant"]: {**e, "status": NOTE_STATUS[t]} for t in NOTE_STATUS for e in data.get(t, [])}


def _excused(row: dict[str, Any], notes: dict[str, dict[str, str]]) -> bool:
    """Whether a note names this mutant with a line of its diff (so a stale note excuses nothing)."""
    note = notes.get(row["mutant"])
    return note is not None and note["diff"] in row.get("diff", "")


def summarise(rows: list[dict[str, Any]], notes: dict[str, dict[str, str]]) -> dict[str, Any]:
    for row in rows:
        if row["status"] == "survived" and _excused(row, notes):
            note = notes[row["mutant"]]
            row["status"], row["reason"] = note["status"], note["reason"]
    modules: dict[str, dict[str, int]] = {}
    measured_on: dict[str, str] = {}
    for row in rows:
        counts = modules.setdefault(row["module"], {})
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        measured_on[row["module"]] = row.get("measured_on", "this run")
    total: dict[str, int] = {}
    for counts in modules.values():
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v

    def score(c: dict[str, int]) -> float | None:
        judged = c.get("killed", 0) + c.get("survived", 0) + c.get("timeout", 0)
        return (c.get("killed", 0) + c.get("timeout", 0)) / judged if judged else None

    return {
        "modules": {
            m: {**c, "score": score(c), "measured_on": measured_on[m]} for m, c in sorted(modules.items())
        },
        "total": {**total, "score": score(total)},
    }


def format_markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    cols = ("killed", "timeout", "survived", "equivalent", "unreachable here", "no tests", "not checked")
    lines = [
        "# Mutation testing of the core (mutmut)",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; mutmut {report['mutmut']}; {report['machine']['cpus']} CPUs.",
        benchlib.source_note(report.get("source")),
        "",
        "Score = (killed + timeout) / (killed + timeout + survived); mutants judged equivalent, those only",
        "a GPU or several processes could tell apart (`unreachable here`; reasons below, from",
        "`benchmarks/mutation_notes.toml`), those no in-process test reaches (`no tests`) and those the",
        "run did not get to (`not checked`) are left out. `measured on`: the code of this run, or, for",
        "a module this run did not mutate, the commit of the earlier run its results are carried from.",
        "",
        "| module | " + " | ".join(cols) + " | score | measured on |",
        "|---|" + "--:|" * (len(cols) + 1) + "---|",
    ]
    for module, c in [*s["modules"].items(), ("**all**", s["total"])]:
        cells = " | ".join(str(c.get(k, 0)) for k in cols)
        pct = None if c["score"] is None else c["score"] * 100
        lines.append(f"| {module} | {cells} | {benchlib.fmt(pct, '.1f', '%')} | {c.get('measured_on', '')} |")
    survivors = [r for r in report["rows"] if r["status"] == "survived"]
    equivalent = [r for r in report["rows"] if r["status"] == "equivalent"]
    unreachable = [r for r in report["rows"] if r["status"] == "unreachable here"]
    sections = (("Surviving mutants", survivors), ("Equivalent mutants", equivalent),
                ("Mutants only a GPU or several processes can tell apart", unreachable))  # fmt: skip
    for title, rows in sections:
        lines += ["", f"## {title} ({len(rows)})", ""]
        for r in rows:
            lines.append(f"- `{r['mutant']}`" + (f": {r['reason']}" if r.get("reason") else ""))
            lines += ["  ```diff", *("  " + x for x in r.get("diff", "").splitlines()), "  ```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", choices=list(MODULES), default=list(MODULES))
    parser.add_argument("--keep", action="store_true", help="reuse the scratch copy of the last run")
    parser.add_argument("--report-only", action="store_true", help="render the last run's results")
    parser.add_argument("--recheck", choices=["survived"], help="re-test the last run's survivors")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--scratch", default="tree", help="name of the scratch copy under .mutation/")
    args = parser.parse_args(argv)
    if shutil.which("mutmut", path=str(Path(sys.executable).parent)) is None:
        print("mutmut is not installed in this environment: run scripts/mutation", file=sys.stderr)
        return 2
    work = SCRATCH / args.scratch
    if not args.report_only:
        if args.keep and work.is_dir():
            _sync_tree(work)
        else:
            if args.recheck:
                parser.error("--recheck needs --keep and an earlier run")
            _copy_tree(work)
            _write_config(work, args.modules)
        notes = load_notes()
        names = [  # survivors a note excuses need no new run
            r["mutant"]
            for r in (collect(work) if args.recheck else [])
            if r["status"] == "survived"
            and any(fnmatch.fnmatch(r["module"], m) for m in args.modules)
            and not _excused(r, notes)
        ]
        if args.recheck and not names:
            print("no survivors to re-test in these modules", file=sys.stderr)
            return 2
        print(f"mutmut in {work} on {', '.join(args.modules)} ({args.jobs} workers) ...", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        exe = Path(sys.executable).with_name("mutmut")
        # the progress line goes straight to the terminal: a run takes hours
        code = subprocess.run(
            [str(exe), "run", "--max-children", str(args.jobs), *names], cwd=work, env=env
        ).returncode
        if code:
            print(f"mutmut run exited with {code}", file=sys.stderr)
            return code
    elif not work.is_dir():
        print(f"no earlier run in {work}", file=sys.stderr)
        return 2
    rows = collect_all()
    carried, previous = carry_over(rows, list(MODULES), args.out.with_suffix(".json"))
    rows += carried
    version = subprocess.run([str(Path(sys.executable).with_name("mutmut")), "--version"],
                             capture_output=True, text=True).stdout.split()[-1:]  # fmt: skip
    report = {
        "command": "scripts/mutation" + (" " + " ".join(argv) if argv else ""),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "mutmut": version[0] if version else "unknown",
        "machine": benchlib.machine(),
        "source": benchlib.source(),
        "modules": args.modules,
        "carried_from": previous,
        "rows": rows,
    }
    report["summary"] = summarise(rows, load_notes())
    benchlib.write_report(args.out, report, format_markdown(report), ensure_ascii=False)
    t = report["summary"]["total"]
    print(
        f"score {t['score']:.1%} ({t.get('killed', 0)} killed, {t.get('survived', 0)} survived); "
        f"wrote {args.out}.md"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
