"""LongWanjuan's classes on synthetic long documents and on real text from this machine.

    python benchmarks/longwanjuan.py [--docs 60] [--steps 400] [--real 60] [--heldout-seed N]

Synthetic documents of ~3000 characters, ``--docs`` per class (seeded):

* holistic: a story that states facts early ("the key of box 17 is 4821") and refers back to them
  later ("she opened box 17 again; its key was still 4821"), with pronouns and connectives;
* aggregated: independent short snippets (catalogue entries, each with its own numbers);
* chaotic: half shuffled characters of a holistic document, half random lower-case words.

The scoring model stands in for LongWanjuan's pretrained LM: a byte-level LLaMA (2 layers, hidden
128, context 512) trained from scratch for ``--steps`` steps (batch 8 x 512 tokens, AdamW 3e-3) on
other documents of the three kinds, mixed with an induction cache. A pretrained LM uses a long
context mainly through induction heads (find the earlier occurrence of the current text, copy what
followed it); the small model does not learn them on this CPU (training on windows with repeated
spans, longer runs and a larger initialisation did not help within 10 minutes: see
docs/data-quality.md), so the scorer adds the mechanism explicitly, as a cache language model does:
at each position the tokens that followed the earlier occurrences of the longest suffix that occurred
before (of length m, in the window) are mixed with the LM's prediction,
``p = lambda(m) * copy + (1 - lambda(m)) * lm``. ``lambda`` per bucket of m is fitted by maximum
likelihood on ``--cache-windows`` windows of new training documents (no scored document).

Every document is scored with windows (512, 128, 64) and classified by the default rules
(``leantune data classify --print-rules``). Reported: the 3-way accuracy and confusion matrix
(goal >= 90%) on the documents of ``--seed`` and on those of ``--heldout-seed`` (a second draw,
default seed + 1, for checking that the rules are not fitted to the first), each class's median
metrics, the same with the LM alone (no cache), and the class counts of real text: the package
descriptions and licences shipped in this virtualenv's ``*.dist-info`` folders (those of at least
one window).

With ``--compare-steps N`` (off by default): the issue's training comparison. Three models like
the LM of the scorer, from the same initialisation and for N steps each (an equal token budget), on
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
from types import SimpleNamespace

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


MATCH_EDGES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48)
"""Buckets of the induction cache's match length m: bucket b holds EDGES[b] <= m < EDGES[b + 1]."""


def match_bucket(m: int) -> int:
    """The bucket of a match of ``m`` >= 1 tokens (see :data:`MATCH_EDGES`)."""
    return sum(m >= e for e in MATCH_EDGES) - 1


def induction(ids: list[int], first: int) -> list[tuple[int, list[int]]]:
    """What an induction head copies, at each position ``t >= first`` of ``ids``: the length m of
    the longest suffix of ``ids[: t + 1]`` that also ends at an earlier position ``j < t``, and the
    tokens ``ids[j + 1]`` that followed every such j (``(0, [])`` when ``ids[t]`` is new)."""
    import numpy as np

    a = np.asarray(ids, dtype=np.int64)
    run = np.zeros(0, dtype=np.int64)  # run[j], j < t: the common suffix of ids[: j + 1] and ids[: t + 1]
    out = []
    for t in range(len(a)):
        prev = np.concatenate((np.zeros(1, dtype=np.int64), run))[:t]  # run of t - 1, shifted by one
        run = np.where(a[:t] == a[t], prev + 1, 0)
        if t >= first:
            m = int(run.max()) if t else 0
            out.append((m, a[1 : t + 1][run == m].tolist() if m else []))
    return out


class InductionCache:
    """The scoring model: an LM mixed with an induction cache through a learnt gate (see the module
    docstring and :func:`fit_cache`). Called like a Hugging Face causal LM; its ``logits`` are the
    mixture's log-probabilities."""

    def __init__(self, lm, gate: dict[str, list[float]]):
        import torch

        self.lm, self.gate = lm, gate
        self._w, self._b = torch.tensor(gate["hidden"]), torch.tensor(gate["match"])

    def parameters(self):
        return self.lm.parameters()

    def buffers(self):
        return self.lm.buffers()

    def __call__(self, input_ids, logits_to_keep: int = 0):
        return self.forward(input_ids=input_ids, logits_to_keep=logits_to_keep)

    def forward(self, input_ids, logits_to_keep: int = 0):
        import torch

        probs, hidden = lm_outputs(self.lm, input_ids, logits_to_keep)
        keep = probs.shape[1]
        for i, row in enumerate(input_ids.tolist()):
            for pos, (m, nexts) in enumerate(induction(row, len(row) - keep)):
                if m:
                    lam = torch.sigmoid(hidden[i, pos] @ self._w + self._b[match_bucket(m)])
                    copy = torch.bincount(torch.tensor(nexts), minlength=probs.shape[-1]).float() / len(nexts)
                    probs[i, pos] = lam * copy + (1 - lam) * probs[i, pos]
        return SimpleNamespace(logits=probs.clamp_min(1e-30).log())


def lm_outputs(lm, input_ids, keep: int = 0):
    """The LM's next-token probabilities and last hidden states (fp32, unit length) at the last
    ``keep`` positions (every position for 0)."""
    import torch

    with torch.no_grad():
        out = lm(input_ids=input_ids, logits_to_keep=keep, output_hidden_states=True)
    probs = torch.softmax(out.logits.float(), -1)
    hidden = out.hidden_states[-1][:, -probs.shape[1] :].float()
    return probs, hidden / hidden.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def fit_cache(lm, tok, windows: int, seed: int, steps: int = 1000) -> dict[str, list[float]]:
    """The gate of the induction cache, ``lambda = sigmoid(w . h + b[bucket(m)])`` from the LM's last
    hidden state h (unit length) and the match length m, as the gate of a pointer sentinel mixture
    model (Merity et al., 2017): it learns where copying is right. Fitted by maximum likelihood of
    the mixture over every position of ``windows`` windows of new documents of the three kinds
    (full-batch Adam, ``steps`` steps). Also returned: the positions, those with a match, and the
    mean nll the cache saves on them (nats per token)."""
    import torch

    rng = random.Random(seed)
    rows = [fresh_window(tok, rng) for _ in range(windows)]
    hs, buckets, p_lm, p_copy = [], [], [], []
    for i in range(0, len(rows), 8):
        batch = rows[i : i + 8]
        probs, hidden = lm_outputs(lm, torch.tensor(batch))
        for row, pr, h in zip(batch, probs, hidden):
            for t, (m, nexts) in enumerate(induction(row, 0)[:-1]):
                if m:
                    y = row[t + 1]
                    hs.append(h[t])
                    buckets.append(match_bucket(m))
                    p_lm.append(pr[t, y].item())
                    p_copy.append(nexts.count(y) / len(nexts))
    h, bk = torch.stack(hs), torch.tensor(buckets)
    pl, pc = torch.tensor(p_lm), torch.tensor(p_copy)
    w = torch.zeros(h.shape[1], requires_grad=True)
    b = torch.zeros(len(MATCH_EDGES), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.1)
    for _ in range(steps):
        lam = torch.sigmoid(h @ w + b[bk])
        loss = -torch.log(lam * pc + (1 - lam) * pl + 1e-30).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        lam = torch.sigmoid(h @ w + b[bk])
        gain = (torch.log(lam * pc + (1 - lam) * pl + 1e-30) - torch.log(pl + 1e-30)).sum().item()
    return {"hidden": [round(x, 6) for x in w.tolist()], "match": [round(x, 6) for x in b.tolist()],
            "positions": len(rows) * (len(rows[0]) - 1), "matched": len(buckets),
            "nll_gain": gain / (len(rows) * (len(rows[0]) - 1))}  # fmt: skip


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


def confusion_table(confusion: dict, classes: list[str]) -> str:
    heads = ["true \\ predicted", *classes]
    cells = [[k, *(str(row[c]) for c in classes)] for k, row in confusion.items()]
    return benchlib.render_table(heads, cells, "l" + "r" * len(classes))


def render(report: dict) -> str:
    """The Markdown report of a result (``benchmarks/results/longwanjuan.json``)."""
    args, medians, held, alone = report["args"], report["medians"], report["heldout"], report["lm_alone"]
    classes = list(report["real_counts"])
    kinds = list(report["confusion"])
    metrics = list(next(iter(medians.values())))
    first, last = report["train_loss_first_last"]
    cells = [[k, *(f"{medians[k][m]:.3f}" for m in metrics)] for k in kinds]
    med = benchlib.render_table(["class", *metrics], cells, "l" + "r" * len(metrics))
    spread = report["ppl_ratio_spread"]
    cells = [[k, *(f"{x:.3f}" for x in spread[k]), *(f"{x:.3f}" for x in alone["ppl_ratio_spread"][k])]
             for k in kinds]  # fmt: skip
    heads = ["class", "min", "median", "max", "LM alone: min", "median", "max"]
    ppl_t = benchlib.render_table(heads, cells, "lrrrrrr")
    cells = [[c, str(report["real_counts"][c]), ", ".join(report["real_examples"][c])] for c in classes]
    real_t = benchlib.render_table(["class", "docs", "examples"], cells, "lrl")
    accuracy, cache = report["accuracy"], report["cache"]
    goal = "met" if min(accuracy, held["accuracy"]) >= 0.9 else "NOT met"
    n_docs = sum(sum(row.values()) for row in report["confusion"].values())
    fitted = f"{args['cache_windows']} windows of new documents"
    matched = cache["matched"] / cache["positions"]
    acc_line = f"{accuracy:.1%} (seed {args['seed']}) and {held['accuracy']:.1%} (seed {held['seed']})"
    windows, t_score = tuple(report["windows"]), report["score_seconds"]
    command = f"--docs {args['docs']} --steps {args['steps']} --real {args['real']}"
    if args["seed"] != 0 or args["heldout_seed"] != 1:
        command += f" --seed {args['seed']} --heldout-seed {args['heldout_seed']}"
    if args.get("compare_steps"):
        command += (
            f" --compare-steps {args['compare_steps']} --pool {args['pool']} --eval-docs {args['eval_docs']}"
        )
    return f"""# LongWanjuan classes: synthetic accuracy and real text

`python benchmarks/longwanjuan.py {command}`

- Scoring model: byte-level LLaMA, 2 layers, hidden 128, trained from scratch for {args["steps"]} steps
  (batch 8 x 512 tokens) on the three synthetic kinds: loss {first:.2f} -> {last:.2f},
  {report["train_seconds"]:.0f} s; mixed with an induction cache whose gate was fitted on {fitted}
  ({matched:.0%} of their positions have an earlier match; the cache lowers the windows' mean nll by
  {cache["nll_gain"]:.4f} nats per token), {cache["seconds"]:.0f} s.
  Windows {windows}; scoring {n_docs} documents took {t_score:.0f} s. {args["threads"]} thread(s).
- Rules: the defaults (`leantune data classify --print-rules`).
- {benchlib.source_note(report.get("source"))[2:]}

## Synthetic documents: 3-way accuracy {acc_line} (goal >= 90%: {goal})

Documents of seed {args["seed"]}:

{confusion_table(report["confusion"], classes)}
Documents of seed {held["seed"]} (a second draw, for checking that the rules are not fitted to the first):

{confusion_table(held["confusion"], classes)}
Median metrics per true class (seed {args["seed"]}):

{med}
`ppl_ratio` per true class (seed {args["seed"]}), with the scorer and with its LM alone (no cache; the rules
would then sort {alone["accuracy"]:.1%} of the documents correctly):

{ppl_t}
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

Three models like the scorer's LM (no cache), from the same initialisation, each trained for {cmp["steps"]}
steps ({cmp["tokens"]:,} tokens) on windows of one pool of {cmp["pool"]} documents per synthetic kind: the
raw mix (every document alike), the LongWanjuan mixture of the classes the scorer and the default rules gave
(chaotic dropped, aggregated up-weighted by token share), and the same recipe on the true classes.
Each final loss is on its own training data.
Measured on the last {WINDOWS[0]}-token window of {cmp["eval_docs"]} held-out holistic documents:
long-range recall is the argmax accuracy on the {digits} key digits that can be copied from earlier
in the window; last-window perplexity is that of its last {WINDOWS[2]} tokens.

{table}"""


def synthetic(seed: int, per_class: int) -> tuple[list[str], list[str]]:
    """``per_class`` documents of each kind drawn with ``seed`` (held out from every training
    stream): (true kinds, texts)."""
    rng = random.Random(seed + 100)
    labels, texts = [], []
    for kind, make in KINDS.items():
        for _ in range(per_class):
            labels.append(kind)
            texts.append(make(rng))
    return labels, texts


def classified(rules, labels: list[str], rows: list[dict]) -> dict:
    """Accuracy and confusion matrix of ``rules`` on scored documents of known kinds."""
    from leantune.data.longtext_classes import CLASSES

    got = [rules.classify(r) for r in rows]
    return {"accuracy": sum(a == b for a, b in zip(labels, got)) / len(labels),
            "confusion": {k: {c: sum(1 for a, b in zip(labels, got) if a == k and b == c) for c in CLASSES}
                          for k in KINDS}}  # fmt: skip


def spread(labels: list[str], rows: list[dict], metric: str = "ppl_ratio") -> dict[str, list[float]]:
    """[min, median, max] of ``metric`` per true kind."""
    out = {}
    for k in KINDS:
        v = [r[metric] for r, lab in zip(rows, labels) if lab == k]
        out[k] = [min(v), statistics.median(v), max(v)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=60, help="synthetic documents per class")
    ap.add_argument("--steps", type=int, default=400, help="training steps of the scoring model's LM")
    ap.add_argument("--cache-windows", type=int, default=256,
                    help="windows of new documents that the induction cache's gate is fitted on")  # fmt: skip
    ap.add_argument("--real", type=int, default=60, help="real documents at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout-seed", type=int, default=None,
                    help="seed of the second draw of documents (default: --seed + 1)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--compare-steps", type=int, default=0,
                    help="training steps of each model of the mixture comparison (0: skip it)")  # fmt: skip
    ap.add_argument("--pool", type=int, default=40, help="comparison: training documents per class")
    ap.add_argument("--eval-docs", type=int, default=20, help="comparison: held-out holistic documents")
    ap.add_argument("--out", type=Path, default=RESULTS / "longwanjuan", help="results path, without suffix")
    args = ap.parse_args(argv)
    if args.heldout_seed is None:
        args.heldout_seed = args.seed + 1
    if args.heldout_seed == args.seed:
        ap.error("--heldout-seed must differ from --seed")

    import torch

    from leantune.data import build_byte_tokenizer
    from leantune.data.longtext_classes import CLASSES, load_rules

    torch.set_num_threads(args.threads)
    tok = build_byte_tokenizer()
    t0 = time.perf_counter()
    lm, losses = train(tok, args.steps, args.seed)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    gate = fit_cache(lm, tok, args.cache_windows, args.seed + 2)
    cache = {k: gate[k] for k in ("positions", "matched", "nll_gain")}
    cache["seconds"] = time.perf_counter() - t0
    model = InductionCache(lm, gate)
    rules = load_rules()
    labels, texts = synthetic(args.seed, args.docs)
    t0 = time.perf_counter()
    rows = score(model, tok, texts)
    t_score = time.perf_counter() - t0
    metrics = ["ppl_ratio", "acc_delta", "word_ttr", "pronoun_rate", "connective_rate", "ttr"]
    medians = {k: {m: statistics.median(r[m] for r, lab in zip(rows, labels) if lab == k) for m in metrics}
               for k in KINDS}  # fmt: skip
    alone_rows = score(lm, tok, texts)
    lm_alone = {**classified(rules, labels, alone_rows), "ppl_ratio_spread": spread(labels, alone_rows)}
    held_labels, held_texts = synthetic(args.heldout_seed, args.docs)
    heldout = {"seed": args.heldout_seed, **classified(rules, held_labels, score(model, tok, held_texts))}
    real = real_texts(args.real)
    real_rows = score(model, tok, [t for _, t in real]) if real else []
    real_classes = [rules.classify(r) for r in real_rows]
    real_counts = {c: real_classes.count(c) for c in CLASSES}
    real_examples = {c: [n for (n, _), k in zip(real, real_classes) if k == c][:3] for c in CLASSES}

    report = {"benchmark": "longwanjuan", "machine": benchlib.machine(), "source": benchlib.source(),
              "args": {**vars(args), "out": str(args.out)}, "windows": WINDOWS, "train_seconds": t_train,
              "score_seconds": t_score, "train_loss_first_last": [losses[0], losses[-1]], "cache": cache,
              **classified(rules, labels, rows), "medians": medians, "ppl_ratio_spread": spread(labels, rows),
              "lm_alone": lm_alone, "heldout": heldout, "real_docs": len(real), "real_counts": real_counts,
              "real_examples": real_examples}  # fmt: skip
    if args.compare_steps > 0:
        report["comparison"] = compare(tok, model, rules, args)
    md = render(report)
    benchlib.write_report(args.out, report, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
