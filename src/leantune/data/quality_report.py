"""What ``leantune data classify`` and ``leantune data mix`` write: the class report (counts, token
shares, a histogram per metric, examples) and the per-class files with their mixture YAML."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from leantune.data.longtext_classes import CLASSES, Rules, mixture
from leantune.data.quality_inputs import read_records
from leantune.data.records import DataError

__all__ = ["class_table", "write_mixture", "write_report"]

# Shown in every report besides the metrics the rules read.
REPORT_METRICS = ("ppl_ratio", "acc_delta", "ttr", "word_ttr", "pronoun_rate", "connective_rate", "line_mean")


def class_table(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per class: ``docs``, ``tokens`` and their shares of all rows."""
    docs = {c: 0 for c in CLASSES}
    tokens = {c: 0.0 for c in CLASSES}
    for r in rows:
        docs[r["class"]] += 1
        t = r.get("tokens", 0.0)
        tokens[r["class"]] += t if isinstance(t, (int, float)) and not math.isnan(t) else 0.0
    n, t = sum(docs.values()) or 1, sum(tokens.values()) or 1.0
    return {c: {"docs": docs[c], "tokens": tokens[c], "doc_share": docs[c] / n, "token_share": tokens[c] / t}
            for c in CLASSES}  # fmt: skip


def _histogram(path: Path, metric: str, rows: Sequence[dict[str, Any]]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for c in CLASSES:
        vals = [r[metric] for r in rows if r["class"] == c and isinstance(r.get(metric), (int, float))]
        vals = [v for v in vals if math.isfinite(v)]
        if vals:
            series[c] = vals
    if not series:
        return False
    lo = min(min(v) for v in series.values())
    hi = max(max(v) for v in series.values())
    bins = 30 if hi > lo else 1
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for c, vals in series.items():
        ax.hist(
            vals, bins=bins, range=(lo, hi if hi > lo else lo + 1), alpha=0.55, label=f"{c} ({len(vals)})"
        )
    ax.set_xlabel(metric)
    ax.set_ylabel("documents")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(
    out: Path, rows: Sequence[dict[str, Any]], rules: Rules, *, examples: int = 2, text_field: str = "text"
) -> str:
    """``report.md``, ``report.json`` and ``hist_<metric>.png`` in ``out``; returns the class table
    as text."""
    out.mkdir(parents=True, exist_ok=True)
    table = class_table(rows)
    lines = ["| class | docs | share | tokens | token share |", "|---|---:|---:|---:|---:|"]
    for c, v in table.items():
        lines.append(
            f"| {c} | {v['docs']} | {v['doc_share']:.1%} | {v['tokens']:.0f} | {v['token_share']:.1%} |"
        )
    summary = "\n".join(lines)
    metrics = list(dict.fromkeys([*rules.metrics, *REPORT_METRICS]))
    plots = [m for m in metrics if _histogram(out / f"hist_{m}.png", m, rows)]
    md = ["# Long-text classes (LongWanjuan)", "", f"{len(rows)} scored documents.", "", summary, ""]
    md += ["Rules (any chaotic range, else all holistic ranges, else aggregated):", "", "```"]
    for section in ("chaotic", "holistic"):
        for m, ranges in getattr(rules, section).items():
            md.append(f"{section}: {m} in " + " or ".join(f"[{r.min}, {r.max}]" for r in ranges))
    md += ["```", ""]
    md += [f"![{m}](hist_{m}.png)" for m in plots] + [""]
    picked: dict[str, list[dict[str, Any]]] = {
        c: [r for r in rows if r["class"] == c][:examples] for c in CLASSES
    }
    by_file: dict[str, set[int]] = {}
    for rs in picked.values():
        for r in rs:
            by_file.setdefault(r["data"], set()).add(int(r["line"]))
    texts = {}
    for f, wanted in by_file.items():
        try:
            found = read_records(f, wanted)
        except (OSError, DataError):
            continue  # the data file moved: the report keeps the scores
        for n, rec in found.items():
            try:
                rec = json.loads(rec.decode("utf-8")) if isinstance(rec, bytes) else rec
                texts[(f, n)] = rec.get(text_field, "")
            except (ValueError, AttributeError):
                texts[(f, n)] = ""
    for c, rs in picked.items():
        if not rs:
            continue
        md += [f"## {c}", ""]
        for r in rs:
            vals = ", ".join(f"{m} {r.get(m, math.nan):.4g}" for m in rules.metrics)
            md += [f"{r['data']}:{r['line']} ({vals})", "", "```"]
            md += [
                str(texts.get((r["data"], int(r["line"])), "(text not found)"))[:600].replace("```", "'''"),
                "```",
                "",
            ]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    report = {"documents": len(rows), "classes": table, "plots": [f"hist_{m}.png" for m in plots],
              "rules": {"chaotic": {m: [vars(r) for r in rs] for m, rs in rules.chaotic.items()},
                        "holistic": {m: [vars(r) for r in rs] for m, rs in rules.holistic.items()},
                        "upsample": rules.upsample}}  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return summary


def _as_record(rec: dict[str, Any] | bytes, where: str) -> dict[str, Any]:
    if isinstance(rec, dict):
        return rec
    try:
        value = json.loads(rec.decode("utf-8"))
    except ValueError:
        raise DataError(f"{where}: not a JSON object; it was scored, has the file changed?") from None
    if not isinstance(value, dict):
        raise DataError(f"{where}: not a JSON object; it was scored, has the file changed?")
    return value


def _write_class_files(out: Path, rows: Sequence[dict[str, Any]], fmt: str) -> list[str]:
    """Each class's documents to ``out/<class>.<fmt>``; returns the classes written."""
    by_file: dict[str, dict[int, str]] = {}
    for r in rows:
        by_file.setdefault(r["data"], {})[int(r["line"])] = r["class"]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Parquet: each class's rows are gathered in memory and written once, so that inputs whose
        # columns differ a little (a missing column, int vs float) merge into one schema.
        tables: dict[str, list[Any]] = {}
        for f, classes in by_file.items():
            records: dict[str, list[dict[str, Any]]] = {}
            for n, rec in sorted(read_records(f, set(classes)).items()):
                records.setdefault(classes[n], []).append(_as_record(rec, f"{f}:{n}"))
            for c, recs in records.items():
                tables.setdefault(c, []).append(pa.Table.from_pylist(recs))
        for c, ts in tables.items():
            try:
                table = pa.concat_tables(ts, promote_options="permissive")
            except pa.ArrowException as err:
                raise DataError(f"the {c} documents' columns do not merge into one table ({err})") from None
            pq.write_table(table, out / f"{c}.parquet")
        return list(tables)
    handles: dict[str, Any] = {}
    try:
        for f, classes in by_file.items():
            for n, rec in sorted(read_records(f, set(classes)).items()):
                c = classes[n]
                if c not in handles:
                    handles[c] = (out / f"{c}.jsonl").open("wb")
                if not isinstance(rec, bytes):  # a Parquet row becomes a JSON line
                    rec = (json.dumps(rec, default=str) + "\n").encode()
                handles[c].write(rec)  # a JSON line is copied as it is
    finally:
        for h in handles.values():
            h.close()
    return list(handles)


def write_mixture(out: Path, rows: Sequence[dict[str, Any]], rules: Rules, *, fmt: str = "jsonl") -> str:
    """``out/<class>.jsonl`` or ``.parquet`` (a JSON line copied as is, a Parquet row as a record)
    and ``out/mixture.yaml`` with ``data.train`` / ``data.weights``; returns the YAML text."""
    import yaml

    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"format must be jsonl or parquet, got {fmt!r}")
    out.mkdir(parents=True, exist_ok=True)
    written = _write_class_files(out, rows, fmt)
    table = class_table(rows)
    files = {c: str((out / f"{c}.{fmt}").resolve()) for c in CLASSES if c in written}
    mix = mixture(files, {c: table[c]["tokens"] for c in files}, rules.upsample)
    head = ["# leantune data mix: LongWanjuan's mixture (chaotic dropped, aggregated up-weighted)"]
    for c in CLASSES:
        if table[c]["docs"]:
            head.append(f"# {c}: {table[c]['docs']} docs, {table[c]['tokens']:.0f} tokens, upsample "
                        f"{rules.upsample[c]:g}")  # fmt: skip
    head.append("# weights = token share x upsample, normalised (packed text: samples follow tokens)")
    body = yaml.safe_dump({"data": mix}, sort_keys=False, default_flow_style=None)
    text = "\n".join(head) + "\n" + body
    (out / "mixture.yaml").write_text(text, encoding="utf-8")
    return text
