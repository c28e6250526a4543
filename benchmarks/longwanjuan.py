"""LongWanjuan's classes on synthetic long documents and on real text from this machine.

    python benchmarks/longwanjuan.py [--docs 60] [--steps 400] [--real 60]

Synthetic documents of ~3000 characters, ``--docs`` per class (seeded):

* holistic: a story that states facts early ("the key of box 17 is 4821") and refers back to them
  later ("she opened box 17 again; its key was still 4821"), with pronouns and connectives;
* aggregated: independent short snippets (catalogue entries, each with its own numbers);
* chaotic: half shuffled characters of a holistic document, half random lower-case words.

A byte-level LLaMA (2 layers, hidden 128, context 512) is trained from scratch for ``--steps``
steps (batch 8 x 512 tokens, AdamW 3e-3) on other documents of the three kinds, then every
document is scored with windows (512, 128, 64) and classified by the default rules
(``leantune data classify --print-rules``). Reported: the 3-way accuracy and confusion matrix
(goal >= 90%), each class's median metrics, and the class counts of real text: the package
descriptions and licences shipped in this virtualenv's ``*.dist-info`` folders (those of at least
one window).

With ``--compare-steps N`` (off by default): the issue's training comparison. Three models like
the scoring model, from the same initialisation and for N steps each (an equal token budget), on
windows of one pool of ``--pool`` documents per kind: the raw mix, the LongWanjuan mixture of the
classes the scorer gave (chaotic dropped, aggregated up-weighted by token share, the default
``upsample``), and the same recipe on the true classes. Each is measured on the last window of
``--eval-docs`` held-out holistic documents: long-range recall (argmax accuracy on the key digits
that can be copied from earlier in the window) and the perplexity of the window's last 64 tokens.

Results: ``benchmarks/results/longwanjuan.{md,json}`` (``--out`` for another path).
"""

from __future__ import annotations

import argparse
import math
import random
import re
import statistics
import string
import sys
import time
from pathlib import Path

import benchlib

RESULTS = Path(__file__).resolve().parent / "results"
WINDOWS = (512, 128, 64)
CHARS = 3000
NAMES = ["Ada", "Bruno", "Chen", "Dana", "Emil", "Fay", "Gus", "Hana"]
CONNECT = ["However,", "Therefore,", "Because of this,", "Moreover,", "As a result,", "Then", "Finally,"]


def holistic(rng: random.Random) -> str:
    boxes = rng.sample(range(10, 99), 8)
    keys = {b: rng.randrange(1000, 9999) for b in boxes}
    who = rng.choice(NAMES)
    parts = [f"This is the story of {who} and the old house."]
    parts += [f"The key of box {b} is {keys[b]}." for b in boxes]
    while sum(map(len, parts)) < CHARS:
        b = rng.choice(boxes)
        filler = rng.choice(["She walked through the hall and thought about it.",
                             "It was late, and they were tired, but she kept going.",
                             "This house had many rooms, and each one held a secret."])  # fmt: skip
        parts.append(f"{filler} {rng.choice(CONNECT)} she opened box {b} again; its key was still {keys[b]}.")
    return " ".join(parts)[:CHARS]


def aggregated(rng: random.Random) -> str:
    parts = []
    while sum(map(len, parts)) < CHARS:
        item, price = rng.randrange(100, 999), rng.randrange(10, 99)
        colour = rng.choice(["red", "blue", "green", "black", "white", "grey"])
        size = rng.choice(["small", "medium", "large"])
        parts.append(
            f"Item {item}: {size} {colour} lamp, price {price} euro, code {rng.randrange(1000, 9999)}."
        )
    return "\n".join(parts)[:CHARS]


def chaotic(rng: random.Random) -> str:
    if rng.random() < 0.5:
        chars = list(holistic(rng))
        rng.shuffle(chars)
        return "".join(chars)
    out = []
    while sum(len(w) + 1 for w in out) < CHARS:
        out.append("".join(rng.choices(string.ascii_lowercase, k=rng.randrange(2, 9))))
    return " ".join(out)[:CHARS]


KINDS = {"holistic": holistic, "aggregated": aggregated, "chaotic": chaotic}


def fresh_window(tok, rng: random.Random) -> list[int]:
    """A window of a new document of a random kind (the scoring model's training data)."""
    ids = tok(rng.choice(list(KINDS.values()))(rng), add_special_tokens=False)["input_ids"]
    at = rng.randrange(0, max(1, len(ids) - WINDOWS[0]))
    return ids[at : at + WINDOWS[0]]


def window_sampler(sources: list[list[list[int]]], weights: list[float]):
    """Windows of a fixed pool: the source by its weight, the document uniformly, the start
    uniformly (documents of equal length: a source's share of windows is its share of tokens, as
    in packed training)."""

    def sample(rng: random.Random) -> list[int]:
        ids = rng.choice(rng.choices(sources, weights)[0])
        at = rng.randrange(0, max(1, len(ids) - WINDOWS[0]))
        return ids[at : at + WINDOWS[0]]

    return sample


def train(tok, steps: int, seed: int, sample=None):
    """A byte-level LLaMA from scratch on ``steps`` batches of 8 windows from ``sample(rng)``
    (default: new documents of the three kinds)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=WINDOWS[0],
                      attn_implementation="sdpa", use_cache=False)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed + 1)
    losses = []
    for step in range(steps):
        rows = []
        for _ in range(8):
            rows.append(sample(rng) if sample else fresh_window(tok, rng))
        batch = torch.tensor(rows)
        for g in opt.param_groups:  # warmup 20 steps, then linear decay to 10%
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 20) * (1 - 0.9 * step / steps)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model.eval(), losses


def score(model, tok, texts: list[str]) -> list[dict[str, float]]:
    from leantune.data.quality import Windows, coherence_scores, text_metrics, token_metrics

    ids = tok(texts, add_special_tokens=False)["input_ids"]
    coh = coherence_scores(model, ids, Windows(*WINDOWS), batch_size=8)
    return [{**text_metrics(t), **token_metrics(i, len(t)), **c} for t, i, c in zip(texts, ids, coh)]


_RECALL = re.compile(r"box (\d+) again; its key was still (\d{4})")


def recall_positions(window: str) -> list[int]:
    """Character (= byte token) positions of the key digits in ``window`` that can be copied from
    earlier in it: "box B again; its key was still K" where box B's key K was stated before."""
    out = []
    for m in _RECALL.finditer(window):
        box, key = m.groups()
        before = window[: m.start()]
        if f"box {box} is {key}" in before or f"box {box} again; its key was still {key}" in before:
            out += range(m.start(2), m.end(2))
    return out


def evaluate(model, tok, texts: list[str]) -> dict[str, float]:
    """On the last window of each held-out document: long-range recall (argmax accuracy on the key
    digits that can be copied from earlier in the window) and the perplexity of its last EVAL
    tokens given the whole window."""
    import torch
    import torch.nn.functional as F

    hits, nlls = [], []
    for text in texts:
        window = text[-WINDOWS[0] :]
        ids = tok(window, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(window), "one byte token per (ASCII) character"
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        e = WINDOWS[2]
        nlls.append(F.cross_entropy(logits[-e - 1 : -1], torch.tensor(ids[-e:])).item())
        hits += [float(logits[p - 1].argmax().item() == ids[p]) for p in recall_positions(window)]
    return {"recall": statistics.fmean(hits) if hits else math.nan, "recall_digits": len(hits),
            "last_window_ppl": math.exp(statistics.fmean(nlls))}  # fmt: skip


def compare(tok, model, rules, args) -> dict:
    """Models trained at an equal token budget on a fixed pool of documents: the raw mix, the
    LongWanjuan mixture by the scorer's classes, and the same recipe by the true classes."""
    from leantune.data.longtext_classes import CLASSES, mixture

    rng = random.Random(args.seed + 200)
    pool = [(k, make(rng)) for k, make in KINDS.items() for _ in range(args.pool)]
    ids = tok([t for _, t in pool], add_special_tokens=False)["input_ids"]
    predicted = [rules.classify(r) for r in score(model, tok, [t for _, t in pool])]
    held_out = [holistic(random.Random(args.seed + 300 + i)) for i in range(args.eval_docs)]
    recipes = {"raw mix": ([ids], [1.0], {})}
    truth = [k for k, _ in pool]
    labelled = {"LongWanjuan (scorer's classes)": predicted, "LongWanjuan (true classes)": truth}
    for name, labels in labelled.items():
        by_class = {c: [x for x, lab in zip(ids, labels) if lab == c] for c in CLASSES}
        by_class = {c: v for c, v in by_class.items() if v}
        mix = mixture({c: c for c in by_class}, {c: sum(map(len, v)) for c, v in by_class.items()},
                      rules.upsample)  # fmt: skip
        shown = dict(zip(mix["train"], mix["weights"]))
        recipes[name] = ([by_class[c] for c in mix["train"]], mix["weights"], shown)
    runs = {}
    for name, (sources, weights, shown) in recipes.items():
        t0 = time.perf_counter()
        trained, losses = train(tok, args.compare_steps, args.seed + 7, window_sampler(sources, weights))
        runs[name] = {"weights": shown, "final_loss": statistics.fmean(losses[-10:]),
                      "seconds": time.perf_counter() - t0, **evaluate(trained, tok, held_out)}  # fmt: skip
    return {"steps": args.compare_steps, "tokens": args.compare_steps * 8 * WINDOWS[0], "pool": args.pool,
            "eval_docs": args.eval_docs, "runs": runs}  # fmt: skip


def real_texts(limit: int) -> list[tuple[str, str]]:
    """Package descriptions (METADATA bodies) and licences of this virtualenv, longest first."""
    site = (
        Path(sys.prefix)
        / "lib"
        / f"python{sys.version_info.major}.{sys.version_info.minor}"
        / "site-packages"
    )
    found = []
    for p in sorted(site.glob("*.dist-info/*")):
        if p.name not in ("METADATA",) and not p.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if p.name == "METADATA":
            text = text.split("\n\n", 1)[1] if "\n\n" in text else ""  # the description after the headers
        if len(text.encode()) >= WINDOWS[0]:
            found.append((f"{p.parent.name}/{p.name}", text[:20000]))
    found.sort(key=lambda x: -len(x[1]))
    return found[:limit]


def render(report: dict) -> str:
    """The Markdown report of a result (``benchmarks/results/longwanjuan.json``)."""
    args, confusion, medians = report["args"], report["confusion"], report["medians"]
    classes = list(report["real_counts"])
    kinds = list(confusion)
    metrics = list(next(iter(medians.values())))
    first, last = report["train_loss_first_last"]
    heads = ["true \\ predicted", *classes]
    table = benchlib.render_table(
        heads, [[k, *(str(confusion[k][c]) for c in classes)] for k in kinds], "l" + "r" * len(classes)
    )
    cells = [[k, *(f"{medians[k][m]:.3f}" for m in metrics)] for k in kinds]
    med = benchlib.render_table(["class", *metrics], cells, "l" + "r" * len(metrics))
    cells = [[c, str(report["real_counts"][c]), ", ".join(report["real_examples"][c])] for c in classes]
    real_t = benchlib.render_table(["class", "docs", "examples"], cells, "lrl")
    accuracy = report["accuracy"]
    goal = "met" if accuracy >= 0.9 else "NOT met"
    n_docs = sum(sum(row.values()) for row in confusion.values())
    windows, t_score = tuple(report["windows"]), report["score_seconds"]
    command = f"--docs {args['docs']} --steps {args['steps']} --real {args['real']}"
    if args.get("compare_steps"):
        command += (
            f" --compare-steps {args['compare_steps']} --pool {args['pool']} --eval-docs {args['eval_docs']}"
        )
    return f"""# LongWanjuan classes: synthetic accuracy and real text

`python benchmarks/longwanjuan.py {command}`

- Scoring model: byte-level LLaMA, 2 layers, hidden 128, trained from scratch for {args["steps"]} steps
  (batch 8 x 512 tokens) on the three synthetic kinds: loss {first:.2f} -> {last:.2f},
  {report["train_seconds"]:.0f} s. Windows {windows}; scoring {n_docs} documents took {t_score:.0f} s.
- Rules: the defaults (`leantune data classify --print-rules`).
- {benchlib.source_note(report.get("source"))[2:]}

## Synthetic documents: 3-way accuracy {accuracy:.1%} (goal >= 90%: {goal})

{table}
Median metrics per true class:

{med}
## Real text: {report["real_docs"]} package descriptions and licences from this virtualenv's `*.dist-info`

{real_t}
{render_comparison(report.get("comparison"))}"""


def render_comparison(cmp: dict | None) -> str:
    """The training comparison's section (or the note that it was not run)."""
    if not cmp:
        return (
            "Not measured: the training comparison of the issue (raw mix vs LongWanjuan mixture at an equal\n"
            "token budget).\n"
        )
    cells = []
    for name, r in cmp["runs"].items():
        weights = ", ".join(f"{c} {w:.2f}" for c, w in r["weights"].items()) or "uniform"
        cells.append([name, weights, f"{r['recall']:.1%}", f"{r['last_window_ppl']:.2f}",
                      f"{r['final_loss']:.3f}", f"{r['seconds']:.0f}"])  # fmt: skip
    heads = ["training data", "weights", "long-range recall", "last-window ppl", "final loss", "s"]
    table = benchlib.render_table(heads, cells, "llrrrr")
    digits = next(iter(cmp["runs"].values()))["recall_digits"]
    return f"""## Training at an equal token budget: raw mix vs the LongWanjuan mixture

Three models like the scoring model, from the same initialisation, each trained for {cmp["steps"]}
steps ({cmp["tokens"]:,} tokens) on windows of one pool of {cmp["pool"]} documents per synthetic kind: the
raw mix (every document alike), the LongWanjuan mixture of the classes the scorer and the default rules gave
(chaotic dropped, aggregated up-weighted by token share), and the same recipe on the true classes.
Measured on the last {WINDOWS[0]}-token window of {cmp["eval_docs"]} held-out holistic documents:
long-range recall is the argmax accuracy on the {digits} key digits that can be copied from earlier
in the window; last-window perplexity is that of its last {WINDOWS[2]} tokens.

{table}"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=60, help="synthetic documents per class")
    ap.add_argument("--steps", type=int, default=400, help="training steps of the scoring model")
    ap.add_argument("--real", type=int, default=60, help="real documents at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-steps", type=int, default=0,
                    help="training steps of each model of the mixture comparison (0: skip it)")  # fmt: skip
    ap.add_argument("--pool", type=int, default=40, help="comparison: training documents per class")
    ap.add_argument("--eval-docs", type=int, default=20, help="comparison: held-out holistic documents")
    ap.add_argument("--out", type=Path, default=RESULTS / "longwanjuan", help="results path, without suffix")
    args = ap.parse_args(argv)

    import torch

    from leantune.data import build_byte_tokenizer
    from leantune.data.longtext_classes import CLASSES, load_rules

    torch.set_num_threads(2)
    tok = build_byte_tokenizer()
    t0 = time.perf_counter()
    model, losses = train(tok, args.steps, args.seed)
    t_train = time.perf_counter() - t0
    rng = random.Random(args.seed + 100)  # held-out documents, not seen in training
    labels, texts = [], []
    for kind, make in KINDS.items():
        for _ in range(args.docs):
            labels.append(kind)
            texts.append(make(rng))
    t0 = time.perf_counter()
    rows = score(model, tok, texts)
    t_score = time.perf_counter() - t0
    rules = load_rules()
    got = [rules.classify(r) for r in rows]
    accuracy = sum(a == b for a, b in zip(labels, got)) / len(labels)
    confusion = {
        k: {c: sum(1 for a, b in zip(labels, got) if a == k and b == c) for c in CLASSES} for k in KINDS
    }
    metrics = ["ppl_ratio", "acc_delta", "word_ttr", "pronoun_rate", "connective_rate", "ttr"]
    medians = {k: {m: statistics.median(r[m] for r, lab in zip(rows, labels) if lab == k) for m in metrics}
               for k in KINDS}  # fmt: skip
    real = real_texts(args.real)
    real_rows = score(model, tok, [t for _, t in real]) if real else []
    real_classes = [rules.classify(r) for r in real_rows]
    real_counts = {c: real_classes.count(c) for c in CLASSES}
    real_examples = {c: [n for (n, _), k in zip(real, real_classes) if k == c][:3] for c in CLASSES}

    report = {"benchmark": "longwanjuan", "machine": benchlib.machine(), "source": benchlib.source(),
              "args": {**vars(args), "out": str(args.out)}, "windows": WINDOWS, "train_seconds": t_train,
              "score_seconds": t_score,
              "train_loss_first_last": [losses[0], losses[-1]], "accuracy": accuracy, "confusion": confusion,
              "medians": medians, "real_docs": len(real), "real_counts": real_counts,
              "real_examples": real_examples}  # fmt: skip
    if args.compare_steps > 0:
        report["comparison"] = compare(tok, model, rules, args)
    md = render(report)
    benchlib.write_report(args.out, report, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
