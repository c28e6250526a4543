"""``leantune data score | classify | mix``: LongWanjuan's long-text quality metrics, classes and
training mixture (registered by :mod:`leantune.commands.data`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

SCORE_HELP = """\
Scores each document ({"text": ...} per line of a JSON-lines file, or a row of a Parquet file with a
text column) with LongWanjuan's metrics and writes FILE.scores.jsonl beside it, in input order:
complexity (type-token ratio of the model's tokens and of words, line statistics), cohesion (pronoun
and connective rates) and coherence: the document is cut into LONG-token windows whose last EVAL
tokens are scored with the whole window as context and with only its last SHORT tokens (acc/ppl with
and without the long context, their delta and ratio). Documents shorter than one window get NaN
coherence (null in the file); lines without a document (not UTF-8, malformed, no text field, empty
text) are written as skipped with the reason and counted. Running the same command again resumes:
rows already written are kept. --nproc N (or torchrun) shards the documents over N ranks; rank 0
writes the file.

examples:
  leantune data score books.jsonl --model runs/RUN
  leantune data score a.jsonl b.parquet --model ./llama-7b --windows 4096,2048,1024 --dtype bf16
  leantune data score books.jsonl --model ./llama-7b --nproc 8
"""


def register(inner: argparse._SubParsersAction) -> None:
    """Add ``score``, ``classify`` and ``mix`` to the ``leantune data`` sub-commands."""
    raw = argparse.RawDescriptionHelpFormatter
    q = inner.add_parser("score", help="long-text quality metrics per document (LongWanjuan)",
                         description=SCORE_HELP, formatter_class=raw)  # fmt: skip
    q.add_argument("files", nargs="+", metavar="FILE", help="JSON-lines files of documents")
    q.add_argument("--model", required=True, metavar="RUN|MODEL_DIR",
                   help="the scoring LM: a run, checkpoint or HF model directory")  # fmt: skip
    q.add_argument("--windows", default="4096,2048,1024", metavar="LONG,SHORT,EVAL",
                   help="coherence windows in tokens (default: the paper's 4096,2048,1024)")  # fmt: skip
    q.add_argument("--field", default="text", help="the records' text field (default text)")
    q.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    q.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="the model's dtype (default: as saved); losses are computed in fp32")  # fmt: skip
    q.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="score on N processes (torchrun, documents sharded; a GPU each on CUDA)")  # fmt: skip
    q.set_defaults(func=run_score)

    rules_help = "YAML of per-metric thresholds (default: `leantune data classify --print-rules`)"
    c = inner.add_parser(
        "classify",
        help="holistic / aggregated / chaotic classes of scored documents, with a report",
        description="Sorts scored documents (FILE.scores.jsonl beside each FILE, from `leantune data "
        "score`) into LongWanjuan's classes by threshold rules, and writes a report to --out: counts and "
        "token shares per class, a histogram per metric (PNG) and examples per class.",
    )
    c.add_argument("files", nargs="*", metavar="FILE", help="the scored data files (or their .scores.jsonl)")
    c.add_argument("--rules", metavar="RULES.yaml", help=rules_help)
    c.add_argument("--out", metavar="DIR", help="report directory (default: FIRST_FILE.classes/ beside it)")
    c.add_argument("--examples", type=int, default=2, help="examples per class in the report (default 2)")
    c.add_argument("--print-rules", action="store_true", help="print the default rules (YAML) and exit")
    c.set_defaults(func=run_classify)

    m = inner.add_parser(
        "mix",
        help="the LongWanjuan training mixture: per-class files and data.train / data.weights",
        description="Writes the documents of each class to DIR/<class>.jsonl and DIR/mixture.yaml with "
        "the data.train and data.weights that drop chaotic text and up-weight aggregated text (the rules' "
        "`upsample`); train on it with `leantune train DIR/mixture.yaml [key=value ...]`.",
    )
    m.add_argument("files", nargs="+", metavar="FILE", help="the scored data files")
    m.add_argument("--rules", metavar="RULES.yaml", help=rules_help)
    m.add_argument("--out", required=True, metavar="DIR", help="where the class files and mixture.yaml go")
    m.add_argument("--format", default="jsonl", choices=("jsonl", "parquet"),
                   help="the class files' format (default jsonl: JSON lines copied as they are)")  # fmt: skip
    m.set_defaults(func=run_mix)


def _fail(command: str, err: BaseException) -> int:
    print(f"leantune data {command}: {err}", file=sys.stderr)
    return 2


def _progress(enabled: bool = True):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(TextColumn("[bold]score {task.fields[name]}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console,
                    disable=not (enabled and console.is_terminal))  # fmt: skip


def _launch(args: argparse.Namespace) -> int:
    """``--nproc N``: the same command under ``torchrun --nproc-per-node N``."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "leantune", "data", "score", *args.files, "--model", args.model, "--windows", args.windows,
           "--field", args.field, "--batch-size", str(args.batch_size), "--device", args.device,
           "--dtype", args.dtype]  # fmt: skip
    print("leantune: launching " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd)


def run_score(args: argparse.Namespace) -> int:
    import os

    import torch

    from leantune.data.quality import Windows
    from leantune.data.quality_files import check_readable
    from leantune.inference import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    main = int(os.environ.get("RANK", "0")) == 0
    dtypes = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    try:
        windows = Windows.parse(args.windows)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
        paths = [check_readable(f, args.field) for f in args.files]  # every file before the model
        device = resolve_device(args.device)
        if world > 1 and device.index is not None:
            raise ValueError(f"--device {args.device} under {world} ranks: use cuda (rank i takes cuda:i)")
    except (FileNotFoundError, OSError, ValueError) as err:  # DataError is a ValueError
        return _fail("score", err) if main else 2
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch(args)
    if world > 1:
        from leantune.distributed.runtime import init_distributed

        device = init_distributed("ddp", device=device.type).device
    try:
        return _score_files(args, paths, device, dtypes[args.dtype], windows, main)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _score_files(args: argparse.Namespace, paths: list[Path], device: Any, dtype: Any, windows: Any,
                 main: bool) -> int:  # fmt: skip
    """Score each file on this rank (all ranks of a torchrun job run this together)."""
    from leantune.data import DataError
    from leantune.data.quality_files import score_file, scores_path
    from leantune.data.quality_inputs import count_documents
    from leantune.inference import load_for_inference

    try:
        loaded = load_for_inference(args.model, device=device, dtype=dtype)
    except (FileNotFoundError, OSError, ValueError) as err:
        return _fail("score", err)
    if main and not getattr(loaded.tokenizer, "is_fast", False):
        print("note: a slow (Python) tokenizer: tokenisation runs on one thread", file=sys.stderr)
    name = str(loaded.model_dir.resolve())
    code, report = 0, []
    with _progress(enabled=main) as bar:
        for path in paths:
            task = bar.add_task("score", total=count_documents(path), name=path.name)
            try:
                counts = score_file(path, loaded.model, loaded.tokenizer, windows, model_name=name,
                                    text_field=args.field, batch_size=args.batch_size,
                                    on_line=lambda n, t=task: bar.advance(t, n))  # fmt: skip
            except (FileNotFoundError, DataError, RuntimeError) as err:
                if main:
                    print(f"leantune data score: {err}", file=sys.stderr)
                code = 2
                continue
            report.append(f"{path} -> {scores_path(path)}: {counts.summary()}")
            report += [f"  skipped {line}" for line in counts.first_skips]
    if main:
        print("\n".join(report))  # on stdout, after the bar (on stderr) is gone
    return code


def _pairs(files: list[str]) -> list[tuple[Path, Path]]:
    """(data file, scores file) per argument, which may name either."""
    from leantune.data.quality_files import scores_path

    out = []
    for f in files:
        p = Path(f)
        if p.name.endswith(".scores.jsonl"):
            stem = p.name[: -len(".scores.jsonl")]
            found = [x for x in (p.with_name(stem + ".jsonl"), p.with_name(stem + ".parquet")) if x.exists()]
            data, scores = (found or [p.with_name(stem + ".jsonl")])[0], p
        else:
            data, scores = p, scores_path(p)
        if not scores.is_file():
            raise FileNotFoundError(
                f"{scores}: no scores for {data}; run `leantune data score {data} --model ...` first"
            )
        out.append((data, scores))
    return out


def _classified(
    files: list[str], rules_path: str | None, *, strict: bool
) -> tuple[Any, list[dict[str, Any]], str]:
    """The rules, every scored row with its ``data`` path and ``class``, and the text field.

    A data file changed since it was scored is an error when ``strict`` (its rows would pick other
    documents), else a warning.
    """
    from leantune.data import DataError
    from leantune.data.longtext_classes import load_rules
    from leantune.data.quality_files import read_scores, score_keys
    from leantune.data.quality_inputs import check_unchanged

    rules = load_rules(rules_path, known=score_keys())
    rows, field = [], "text"
    for data, scores in _pairs(files):
        meta, found = read_scores(scores)
        field = (meta or {}).get("field", field)
        try:
            checked = check_unchanged(data, scores, meta) if data.exists() else True
        except DataError as err:
            if strict:
                raise
            print(f"warning: {err}; the report's examples may be other documents", file=sys.stderr)
            checked = True
        if not checked:
            print(f"note: {scores} predates input fingerprints: cannot tell whether {data} changed since",
                  file=sys.stderr)  # fmt: skip
        for r in found:
            if r.get("status") == "skipped":
                continue
            r["class"] = rules.classify(r)
            r["data"] = str(data)
            rows.append(r)
    return rules, rows, field


def run_classify(args: argparse.Namespace) -> int:
    from leantune.data.longtext_classes import DEFAULT_RULES
    from leantune.data.quality_report import write_report

    if args.print_rules:
        print(DEFAULT_RULES, end="")
        return 0
    if not args.files:
        return _fail("classify", ValueError("give the scored data files (or --print-rules)"))
    try:
        rules, rows, field = _classified(args.files, args.rules, strict=False)
        out = Path(args.out) if args.out else Path(args.files[0]).with_suffix(".classes")
        summary = write_report(out, rows, rules, examples=args.examples, text_field=field)
    except (FileNotFoundError, OSError, ValueError) as err:
        return _fail("classify", err)
    print(summary)
    print(f"report: {out / 'report.md'}")
    return 0


def run_mix(args: argparse.Namespace) -> int:
    from leantune.data.quality_report import write_mixture

    try:
        rules, rows, _ = _classified(args.files, args.rules, strict=True)
        text = write_mixture(Path(args.out), rows, rules, fmt=args.format)
    except (FileNotFoundError, OSError, ValueError) as err:
        return _fail("mix", err)
    print(text, end="")
    print(f"train on it: leantune train {Path(args.out) / 'mixture.yaml'} [key=value ...]")
    return 0
