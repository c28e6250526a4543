"""RoPE base arithmetic from "Scaling Laws of RoPE-based Extrapolation" (Liu et al., arXiv 2310.05209).

Rotary position embedding rotates dimension pair ``n`` of a head of size ``d`` by the angle
``t * theta_n`` at position ``t``, with ``theta_n = base^(-2n/d)``. A pair whose period
``T_n = 2*pi / theta_n`` is longer than the pretraining length never completes a full turn during
pretraining, so the model only learns part of its cosine curve: the first such pair (the *critical
dimension*) sets how far the model extrapolates. Everything here is closed-form arithmetic on
``(head_dim, base, lengths)`` - no model, no torch - so it answers "which ``rope_theta`` do I need
for a 128K context?" before any GPU time is spent. ``plot_periods`` draws the picture.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PAPER_PRETRAIN_BASE",
    "RopeReport",
    "base_for_target_length",
    "critical_base",
    "critical_dimension",
    "extrapolation_bound",
    "plot_periods",
    "rope_params_from_hf_config",
    "rope_report",
    "rotary_frequencies",
    "rotary_periods",
    "small_base_thresholds",
]

PAPER_PRETRAIN_BASE = 10000.0
"""The rotary base of the original RoPE and of LLaMA 1/2, which the paper's formulas are written for."""

_TWO_PI = 2.0 * math.pi


# --------------------------------------------------------------------------------------------------
# validation


def _check_head_dim(head_dim: Any) -> int:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int):
        raise ValueError(f"head_dim must be an int, got {head_dim!r}")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int (RoPE rotates pairs), got {head_dim}")
    return head_dim


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_base(name: str, base: Any) -> float:
    base = _check_real(name, base)
    if base <= 1.0:
        raise ValueError(f"{name} must be > 1 (theta_n = base^(-2n/d)), got {base:g}")
    return base


def _check_length(name: str, length: Any) -> float:
    length = _check_real(name, length)
    # Below 2*pi even the fastest pair (period 2*pi) does not turn once, and every log below is < 0.
    if length <= _TWO_PI:
        raise ValueError(f"{name} must be > 2*pi (about 6.28) tokens, got {length:g}")
    return length


# --------------------------------------------------------------------------------------------------
# the formulas


def rotary_frequencies(head_dim: int, base: float) -> list[float]:
    r"""Rotary angular frequencies of each dimension pair.

    .. math:: \theta_n = \mathrm{base}^{-2n/d}, \qquad n = 0, \dots, d/2 - 1

    Args:
        head_dim: attention head size ``d`` (even).
        base: rotary base (``rope_theta``), > 1.

    Returns:
        ``d/2`` frequencies in radians per token, from fastest (``n = 0``, 1 rad/token) to slowest.
    """
    d = _check_head_dim(head_dim)
    base = _check_base("base", base)
    return [base ** (-2.0 * n / d) for n in range(d // 2)]


def rotary_periods(head_dim: int, base: float) -> list[float]:
    r"""Period in tokens of each dimension pair.

    .. math:: T_n = \frac{2\pi}{\theta_n} = 2\pi \cdot \mathrm{base}^{2n/d}, \qquad n = 0, \dots, d/2 - 1

    Args:
        head_dim: attention head size ``d`` (even).
        base: rotary base (``rope_theta``), > 1.

    Returns:
        ``d/2`` periods, increasing from ``2*pi`` to ``2*pi*base^((d-2)/d)``.
    """
    d = _check_head_dim(head_dim)
    base = _check_base("base", base)
    return [_TWO_PI * base ** (2.0 * n / d) for n in range(d // 2)]


def critical_dimension(head_dim: int, train_len: float, base: float = PAPER_PRETRAIN_BASE) -> int:
    r"""Critical dimension for extrapolation: how many dimensions complete a full period in training.

    .. math::
        d_\mathrm{extra} = 2 \left\lceil \frac{d}{2} \log_\beta \frac{T_\mathrm{train}}{2\pi} \right\rceil,
        \qquad \beta = \mathrm{base}

    Dimensions ``0 .. d_extra - 1`` (pairs ``n < d_extra / 2``) see at least one whole period within
    ``T_train`` tokens of pretraining; the remaining ones only see part of theirs, which is where
    extrapolation breaks. For LLaMA 2 (``d = 128``, ``T_train = 4096``, ``base = 10000``) this is 92.

    Note:
        The ceiling counts pair ``n`` as "seen" when ``T_n`` is at most about ``T_train``, as in the
        paper; the result is clipped to ``head_dim`` (when every pair turns fully, it is ``d``).

    Args:
        head_dim: attention head size ``d`` (even).
        train_len: pretraining context length ``T_train`` (> 2*pi).
        base: the rotary base *used in pretraining* (default 10000, the paper's).

    Returns:
        An even int in ``[2, head_dim]``.
    """
    d = _check_head_dim(head_dim)
    t = _check_length("train_len", train_len)
    base = _check_base("base", base)
    half = math.ceil((d / 2) * math.log(t / _TWO_PI) / math.log(base))
    return 2 * min(half, d // 2)


def extrapolation_bound(
    head_dim: int,
    train_len: float,
    base: float,
    pretrain_base: float = PAPER_PRETRAIN_BASE,
) -> float:
    r"""Extrapolation upper bound of a model tuned with a larger rotary base (Theorem 2 of the paper).

    .. math:: T_\mathrm{extra} = 2\pi \cdot \mathrm{base}^{d_\mathrm{extra} / d}

    i.e. the period, under the new ``base``, of the critical dimension. Example: LLaMA 2 tuned with
    ``base = 1e6`` gives ``2*pi * 1e6^(92/128)``, about 129K tokens.

    Note:
        ``d_extra`` is computed with the *pretraining* base and the *pretraining* length
        (:func:`critical_dimension` ``(head_dim, train_len, pretrain_base)``), not with the new base:
        which dimensions were learnt over a whole period is fixed by pretraining, and tuning only
        stretches their periods. This is what reproduces the paper's numbers (computing ``d_extra``
        at ``base = 1e6`` would give 62 and a bound of about 5K). The bound holds when ``base`` is at
        least the :func:`critical_base` of the tuning length; below it the paper's bound is the
        tuning length itself (see :func:`rope_report`). When every dimension completes a period in
        pretraining (``d_extra == d``) the theory gives no bound and this returns ``inf``.

    Args:
        head_dim: attention head size ``d`` (even).
        train_len: pretraining context length ``T_train``.
        base: the rotary base used in tuning / inference.
        pretrain_base: the rotary base used in pretraining (default 10000, the paper's).

    Returns:
        The bound in tokens (a float; ``inf`` when no dimension is under-trained).
    """
    d_extra = critical_dimension(head_dim, train_len, pretrain_base)
    base = _check_base("base", base)
    if d_extra >= head_dim:
        return math.inf
    return _TWO_PI * base ** (d_extra / head_dim)


def critical_base(train_len: float, tune_len: float, pretrain_base: float = PAPER_PRETRAIN_BASE) -> float:
    r"""Critical base for tuning at a longer length (Theorem 2 of the paper).

    .. math:: \beta_0 = \mathrm{base}_\mathrm{pretrain}^{\log_{T_\mathrm{train}/2\pi}(T_\mathrm{tune}/2\pi)}

    The smallest base for which tuning at ``T_tune`` does not already cover the critical
    dimension's period: above it the model's context is bounded by :func:`extrapolation_bound`,
    below it by ``T_tune``. LLaMA 2 tuned 4K -> 16K: about 7.2e4.

    Note:
        The paper's formula uses the *unrounded* critical dimension
        (``d_extra / d = log_base(T_train / 2pi)``), so ``head_dim`` does not enter. It is therefore
        not exactly the base whose rounded bound equals ``T_tune`` (that would be about 5.7e4 for the
        example above); we keep the paper's formula so that its numbers come out.

    Args:
        train_len: pretraining context length ``T_train``.
        tune_len: tuning context length ``T_tune`` (>= ``train_len``).
        pretrain_base: the rotary base used in pretraining (the paper's 10000 by default).

    Returns:
        ``beta_0`` (equal to ``pretrain_base`` when ``tune_len == train_len``).
    """
    t_train = _check_length("train_len", train_len)
    t_tune = _check_length("tune_len", tune_len)
    pretrain_base = _check_base("pretrain_base", pretrain_base)
    if t_tune < t_train:
        raise ValueError(f"tune_len ({t_tune:g}) must be >= train_len ({t_train:g})")
    exponent = math.log(t_tune / _TWO_PI) / math.log(t_train / _TWO_PI)
    return pretrain_base**exponent


def base_for_target_length(
    head_dim: int,
    train_len: float,
    target_len: float,
    pretrain_base: float = PAPER_PRETRAIN_BASE,
) -> float:
    r"""Smallest rotary base whose :func:`extrapolation_bound` reaches ``target_len``.

    .. math:: \mathrm{base} \ge \left(\frac{T_\mathrm{target}}{2\pi}\right)^{d / d_\mathrm{extra}}

    with ``d_extra`` from the pretraining base and length, as in :func:`extrapolation_bound`.
    LLaMA 2 to 100K tokens: about 6.9e5; to 1M: about 1.7e7.

    Note:
        The result is nudged up by a few ulps when needed so that
        ``extrapolation_bound(head_dim, train_len, result, pretrain_base) >= target_len`` holds in
        floating point. Tuning must also be at a length whose :func:`critical_base` is below the
        result, which holds for any tuning length up to about the target. A value below
        ``pretrain_base`` means the pretrained model's bound already exceeds the target.

    Args:
        head_dim: attention head size ``d`` (even).
        train_len: pretraining context length ``T_train``.
        target_len: the context length the model should reach.
        pretrain_base: the rotary base used in pretraining (default 10000, the paper's).

    Returns:
        The base (``T_target / 2pi`` when every dimension turns fully in pretraining, where the
        theory gives no bound at all).
    """
    d_extra = critical_dimension(head_dim, train_len, pretrain_base)
    target = _check_length("target_len", target_len)
    base = (target / _TWO_PI) ** (head_dim / d_extra)
    # Rounding in the power can land one ulp short of the target; the contract is ">=".
    while extrapolation_bound(head_dim, train_len, base, pretrain_base) < target:
        base = math.nextafter(base, math.inf)
    return base


def small_base_thresholds(train_len: float) -> tuple[float, float, float]:
    r"""The three small-base thresholds of Theorem 1 (tuning with a base *below* 10000).

    .. math:: \beta_1 = \frac{2T}{\pi}, \quad \beta_2 = \frac{T}{\pi}, \quad \beta_3 = \frac{T}{2\pi}

    With ``theta_min ~ 1/base`` for the slowest pair, a base below ``beta_1`` makes every pair turn
    at least a quarter period (``pi/2``) within ``T`` tokens, below ``beta_2`` half a period (cos
    covers [-1, 1]) and below ``beta_3`` a whole period, each step improving extrapolation further
    (below ``beta_3`` the paper observes no bound at all). For ``T = 4096``: 2608, 1304, 652
    (rounded).

    Args:
        train_len: the context length the model is tuned at, ``T`` (the paper tunes at ``T_train``).

    Returns:
        ``(2T/pi, T/pi, T/(2pi))`` as floats, unrounded.
    """
    t = _check_length("train_len", train_len)
    return (2.0 * t / math.pi, t / math.pi, t / _TWO_PI)


# --------------------------------------------------------------------------------------------------
# report


@dataclass(frozen=True)
class RopeReport:
    """Everything the scaling laws say about one ``(head_dim, lengths, base)`` setting.

    Build it with :func:`rope_report`; ``format()`` renders it for a terminal.
    """

    head_dim: int
    """Attention head size ``d``."""
    train_len: int
    """Pretraining context length ``T_train``."""
    base: float
    """Rotary base used in tuning / inference."""
    pretrain_base: float
    """Rotary base used in pretraining (the critical dimension depends on it)."""
    tune_len: int | None
    """Tuning context length, if any (``None``: the model is used as pretrained, or tuned at ``T_train``)."""
    target_len: int | None
    """Context length the user wants, if any."""
    critical_dim: int
    """``d_extra``: dimensions ``0 .. d_extra-1`` complete a period within ``T_train`` in pretraining."""
    extrapolation_bound: float
    """``2*pi*base^(d_extra/d)``: the bound when ``base`` is at least the critical base."""
    critical_base: float
    """``beta_0`` for tuning at ``tune_len`` (``pretrain_base`` when there is no longer tuning)."""
    regime: str
    """``"smaller base"``, ``"larger base, below critical"``, ``"larger base"`` or ``"pretrained base"``."""
    predicted_context: float
    """Context length the theory predicts for this setting (``inf``: no bound predicted)."""
    small_base_thresholds: tuple[float, float, float]
    """``(2T/pi, T/pi, T/(2pi))`` for the length the model is tuned at."""
    base_for_target: float | None
    """Smallest base whose bound reaches ``target_len`` (``None`` without a target)."""

    @property
    def target_reached(self) -> bool | None:
        """Whether the predicted context reaches ``target_len`` (``None`` without a target)."""
        if self.target_len is None:
            return None
        return self.predicted_context >= self.target_len

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``inf`` as the string ``"inf"``)."""
        out = asdict(self)
        out["small_base_thresholds"] = list(self.small_base_thresholds)
        out["target_reached"] = self.target_reached
        return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in out.items()}

    def format(self) -> str:
        """A readable multi-line summary."""
        d = self.head_dim
        at = f"T={(self.tune_len or self.train_len):,.0f}"
        b1, b2, b3 = self.small_base_thresholds
        if self.base < self.pretrain_base:
            bound = "- (Theorem 2 is for bases above the pretraining base)"
        else:
            bound = _tokens(self.extrapolation_bound)
        rows = [
            ("head dim d", f"{d}"),
            ("pretraining length T_train", _tokens(self.train_len)),
            ("pretraining base", _num(self.pretrain_base)),
            ("rotary base", _num(self.base)),
            ("tuning length T_tune", _tokens(self.tune_len) if self.tune_len else "- (not tuned longer)"),
            (
                "critical dimension d_extra",
                f"{self.critical_dim} of {d}  (pairs 0..{self.critical_dim // 2 - 1} turn fully in T_train)"
                if self.critical_dim < d
                else f"{d} of {d}  (every pair turns fully in T_train)",
            ),
            ("bound 2pi*base^(d_extra/d)", bound),
            (f"critical base ({at})", _num(self.critical_base)),
            (f"small-base thresholds ({at})", f"2T/pi={b1:,.0f}  T/pi={b2:,.0f}  T/2pi={b3:,.0f}"),
            ("regime", self.regime),
            ("predicted context", _tokens(self.predicted_context)),
        ]
        if self.target_len is not None:
            verdict = "reached" if self.target_reached else "NOT reached"
            rows.append(("target length", f"{_tokens(self.target_len)}  ({verdict})"))
            rows.append(("smallest base for the target", _num(self.base_for_target)))
        width = max(len(k) for k, _ in rows)
        lines = ["RoPE extrapolation (scaling laws of Liu et al. 2023, arXiv 2310.05209)"]
        lines += [f"  {k:<{width}}  {v}" for k, v in rows]
        lines.append(f"  note: {_REGIME_NOTES[self.regime]}")
        return "\n".join(lines)


_REGIME_NOTES = {
    "pretrained base": "base = pretraining base and no longer tuning: the model is trained for T_train.",
    "smaller base": "base < pretraining base (Theorem 1): tuning with a smaller base improves "
    "extrapolation, more so below each small-base threshold; below T/2pi no bound is predicted.",
    "larger base, below critical": "base < critical base (Theorem 2): the context is bounded by the "
    "tuning length; raise the base above the critical base to go further.",
    "larger base": "base >= critical base (Theorem 2): the context is bounded by 2pi*base^(d_extra/d).",
}


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:,.0f}" if x < 1e7 else f"{x:.3g}"


def _tokens(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "unbounded"
    return f"{x:,.0f} tokens" if x < 1e4 else f"{x:,.0f} tokens (~{x / 1000:,.0f}K)"


def rope_report(
    head_dim: int,
    train_len: int,
    base: float,
    tune_len: int | None = None,
    target_len: int | None = None,
    *,
    pretrain_base: float = PAPER_PRETRAIN_BASE,
) -> RopeReport:
    """Gather the critical dimension, bounds, critical base and thresholds for one setting.

    The predicted context follows the paper's two theorems, with ``T = tune_len or train_len``:

    * ``base < pretrain_base`` ("smaller base", Theorem 1): ``T/2pi`` or below -> unbounded,
      otherwise at least ``T`` (the paper gives no closed form between the thresholds).
    * ``base == pretrain_base`` and ``T == T_train`` ("pretrained base"): ``T_train``.
    * ``pretrain_base <= base < critical_base(train_len, T)`` ("larger base, below critical"): ``T``.
    * ``base >= critical_base`` ("larger base"): :func:`extrapolation_bound`.

    Args:
        head_dim: attention head size ``d``.
        train_len: pretraining context length ``T_train``.
        base: rotary base used in tuning / inference.
        tune_len: tuning context length (>= ``train_len``), if the model is tuned longer.
        target_len: a desired context length, to get the smallest base that reaches it.
        pretrain_base: rotary base used in pretraining (default 10000, the paper's).

    Returns:
        A :class:`RopeReport`.
    """
    d = _check_head_dim(head_dim)
    t_train = _check_length("train_len", train_len)
    base = _check_base("base", base)
    pretrain_base = _check_base("pretrain_base", pretrain_base)
    if tune_len is not None:
        _check_length("tune_len", tune_len)
    if target_len is not None:
        _check_length("target_len", target_len)
    t = float(tune_len) if tune_len is not None else t_train

    d_extra = critical_dimension(d, t_train, pretrain_base)
    bound = extrapolation_bound(d, t_train, base, pretrain_base)
    beta0 = critical_base(t_train, t, pretrain_base)
    thresholds = small_base_thresholds(t)
    if base < pretrain_base:
        regime, predicted = "smaller base", (math.inf if base <= thresholds[2] else t)
    elif base == pretrain_base and t == t_train:
        regime, predicted = "pretrained base", t_train
    elif base < beta0:
        regime, predicted = "larger base, below critical", t
    else:
        regime, predicted = "larger base", max(bound, t)
    return RopeReport(
        head_dim=d,
        train_len=train_len,
        base=base,
        pretrain_base=pretrain_base,
        tune_len=tune_len,
        target_len=target_len,
        critical_dim=d_extra,
        extrapolation_bound=bound,
        critical_base=beta0,
        regime=regime,
        predicted_context=float(predicted),
        small_base_thresholds=thresholds,
        base_for_target=(
            base_for_target_length(d, t_train, target_len, pretrain_base) if target_len is not None else None
        ),
    )


# --------------------------------------------------------------------------------------------------
# plot


def plot_periods(
    head_dim: int,
    base: float,
    train_len: float,
    path: str | Path,
    *,
    pretrain_base: float | None = None,
) -> Path:
    """Write a PNG of each dimension's rotary period against the training length.

    Periods ``T_n = 2*pi*base^(2n/d)`` on a log axis, plotted at dimension index ``2n``, with a
    horizontal line at ``T_train`` and a vertical one at the critical dimension ``d_extra``.

    Args:
        head_dim: attention head size ``d``.
        base: rotary base (tuning / inference).
        train_len: pretraining context length ``T_train``.
        path: PNG file to write (parent directories are created).
        pretrain_base: pretraining base when it differs from ``base``: its periods are drawn too,
            ``d_extra`` is computed from it and the bound ``2*pi*base^(d_extra/d)`` is marked.
            ``None``: the model was pretrained with ``base``.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    d = _check_head_dim(head_dim)
    periods = rotary_periods(d, base)
    pre = base if pretrain_base is None else _check_base("pretrain_base", pretrain_base)
    d_extra = critical_dimension(d, train_len, pre)
    dims = [2 * n for n in range(d // 2)]

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    ax.semilogy(dims, periods, marker=".", lw=1.2, label=f"period, base={_num(base)}")
    if pre != base:
        ax.semilogy(
            dims,
            rotary_periods(d, pre),
            ls="--",
            lw=1,
            color="gray",
            label=f"period, pretraining base={_num(pre)}",
        )
        bound = extrapolation_bound(d, train_len, base, pre)
        if math.isfinite(bound):
            ax.axhline(bound, color="tab:green", ls=":", label=f"bound {_tokens(bound)}")
    ax.axhline(train_len, color="tab:red", lw=1, label=f"T_train = {train_len:,.0f}")
    ax.axvline(d_extra, color="black", ls="--", lw=1, label=f"critical dim d_extra = {d_extra}")
    ax.set_xlabel("dimension index 2n")
    ax.set_ylabel("period T_n (tokens)")
    ax.set_title(f"RoPE periods, d={d}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------------
# Hugging Face configs


def _rope_theta_of(cfg: Mapping[str, Any]) -> float | None:
    if cfg.get("rope_theta") is not None:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters")
    if not isinstance(params, Mapping):
        return None
    if params.get("rope_theta") is not None:  # transformers v5: {"rope_type": ..., "rope_theta": ...}
        return float(params["rope_theta"])
    # Models with several attention kinds (e.g. Gemma 3) nest one dict per kind; the full-attention
    # layers are the ones that see the whole context.
    full = params.get("full_attention")
    if isinstance(full, Mapping) and full.get("rope_theta") is not None:
        return float(full["rope_theta"])
    return None


def rope_params_from_hf_config(
    path: str | Path,
    *,
    default_rope_theta: float | None = None,
) -> tuple[int, int, float]:
    """Read ``(head_dim, max_position_embeddings, rope_theta)`` from a Hugging Face ``config.json``.

    * ``head_dim``: the config's ``head_dim`` if present, else ``hidden_size // num_attention_heads``.
    * ``rope_theta``: top-level ``rope_theta`` (transformers v4) or ``rope_parameters.rope_theta``
      (v5; for per-attention-kind dicts, the ``full_attention`` one).
    * Multimodal configs are read from their ``text_config`` when the top level lacks the fields.

    Args:
        path: a model directory holding ``config.json``, or the JSON file itself.
        default_rope_theta: used when the config names no rope theta (old LLaMA configs relied on
            transformers' default of 10000); ``None`` makes that an error.

    Raises:
        FileNotFoundError: no such file / no ``config.json`` in the directory.
        ValueError: the file is not a JSON object or lacks a needed field.
    """
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        where = f"directory {str(p)!r} has no config.json" if p.is_dir() else f"{str(p)!r} does not exist"
        raise FileNotFoundError(f"Hugging Face config not found: {where}")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(file)!r} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(file)!r} must hold a JSON object, got {type(cfg).__name__}")
    text = cfg.get("text_config")
    if "max_position_embeddings" not in cfg and isinstance(text, dict):
        cfg = {**cfg, **text}

    if cfg.get("head_dim") is not None:
        head_dim = int(cfg["head_dim"])
    else:
        missing = [k for k in ("hidden_size", "num_attention_heads") if cfg.get(k) is None]
        if missing:
            raise ValueError(
                f"{str(file)!r} has no head_dim and no {' / '.join(missing)} to derive it from "
                "(head_dim = hidden_size // num_attention_heads)"
            )
        head_dim = int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    if cfg.get("max_position_embeddings") is None:
        raise ValueError(f"{str(file)!r} has no max_position_embeddings")
    max_pos = int(cfg["max_position_embeddings"])
    theta = _rope_theta_of(cfg)
    if theta is None:
        if default_rope_theta is None:
            raise ValueError(
                f"{str(file)!r} has no rope_theta (top level) or rope_parameters.rope_theta; "
                "give default_rope_theta (transformers' LLaMA default is 10000)"
            )
        theta = float(default_rope_theta)
    return head_dim, max_pos, theta
