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

Not done here: the issue's training comparison (a model trained on the raw mix vs the LongWanjuan
mixture at an equal token budget).

Results: ``benchmarks/results/longwanjuan.{md,json}``.
"""

from __future__ import annotations

import argparse
import random
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


def train(tok, steps: int, seed: int):
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
            ids = tok(rng.choice(list(KINDS.values()))(rng), add_special_tokens=False)["input_ids"]
            at = rng.randrange(0, max(1, len(ids) - WINDOWS[0]))
            rows.append(ids[at : at + WINDOWS[0]])
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=60, help="synthetic documents per class")
    ap.add_argument("--steps", type=int, default=400, help="training steps of the scoring model")
    ap.add_argument("--real", type=int, default=60, help="real documents at most")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

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
              "args": vars(args), "windows": WINDOWS, "train_seconds": t_train, "score_seconds": t_score,
              "train_loss_first_last": [losses[0], losses[-1]], "accuracy": accuracy, "confusion": confusion,
              "medians": medians, "real_docs": len(real), "real_counts": real_counts,
              "real_examples": real_examples}  # fmt: skip
    heads = ["true \\ predicted", *CLASSES]
    table = benchlib.render_table(
        heads, [[k, *(str(confusion[k][c]) for c in CLASSES)] for k in KINDS], "lrrrr"
    )
    cells = [[k, *(f"{medians[k][m]:.3f}" for m in metrics)] for k in KINDS]
    med = benchlib.render_table(["class", *metrics], cells, "l" + "r" * len(metrics))
    cells = [[c, str(real_counts[c]), ", ".join(real_examples[c])] for c in CLASSES]
    real_t = benchlib.render_table(["class", "docs", "examples"], cells, "lrl")
    goal = "met" if accuracy >= 0.9 else "NOT met"
    md = f"""# LongWanjuan classes: synthetic accuracy and real text

`python benchmarks/longwanjuan.py --docs {args.docs} --steps {args.steps} --real {args.real}`

- Scoring model: byte-level LLaMA, 2 layers, hidden 128, trained from scratch for {args.steps} steps
  (batch 8 x 512 tokens) on the three synthetic kinds: loss {losses[0]:.2f} -> {losses[-1]:.2f},
  {t_train:.0f} s. Windows {WINDOWS}; scoring {len(texts)} documents took {t_score:.0f} s.
- Rules: the defaults (`leantune data classify --print-rules`).
- {benchlib.source_note(report["source"])[2:]}

## Synthetic documents: 3-way accuracy {accuracy:.1%} (goal >= 90%: {goal})

{table}
Median metrics per true class:

{med}
## Real text: {len(real)} package descriptions and licences from this virtualenv's `*.dist-info`

{real_t}
Not measured: the training comparison of the issue (raw mix vs LongWanjuan mixture at an equal
token budget).
"""
    benchlib.write_report(RESULTS / "longwanjuan", report, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
