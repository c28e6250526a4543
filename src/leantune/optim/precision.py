"""Low-precision support for the fused optimizers: loss scaling and rounding on write-back.

Two independent pieces live here:

* :class:`LossScaler` — static or dynamic loss scaling for fp16 weights. The dynamic scaler backs off
  on overflow *and grows back* after ``growth_interval`` clean steps (public LOMO scalers only
  shrink).
* :class:`WriteBack` — writes an fp32 result into a (possibly low-precision) parameter with one of
  three rounding modes:

  ``nearest``
      round-to-nearest-even, what ``Tensor.copy_`` does. Updates smaller than half a unit in the
      last place (ulp) of the weight are lost: a bf16 weight has 8 significant bits, so an update of
      1e-3 of the weight's magnitude disappears.
  ``stochastic``
      unbiased stochastic rounding: round up with probability equal to the fractional distance to
      the upper neighbour, so ``E[round(x)] = x`` and small updates survive in expectation. For
      bf16 this is the classic bit trick (add 16 random low bits to the fp32 pattern, truncate);
      for fp16 the two neighbours are computed explicitly. No state beyond a seeded generator.
  ``kahan``
      compensated summation: a per-parameter buffer in the weight's dtype carries the rounding error
      of each write to the next one (+2 bytes per bf16/fp16 parameter), deterministic.

fp32 (and fp64) parameters are always written exactly; rounding modes only matter below fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

__all__ = ["LossScaler", "Rounding", "WriteBack", "ROUNDING_MODES", "stochastic_round"]

Rounding = Literal["nearest", "stochastic", "kahan"]
ROUNDING_MODES: tuple[str, ...] = ("nearest", "stochastic", "kahan")
_EXACT_DTYPES = (torch.float32, torch.float64)


class LossScaler:
    """Loss scaling for fp16 training, static or dynamic.

    The scale multiplies the loss before backward; gradients are divided by it before use. A dynamic
    scaler halves (``backoff_factor``) the scale when a step overflows and multiplies it by
    ``growth_factor`` after ``growth_interval`` consecutive clean steps.

    Args:
        init_scale: initial scale.
        dynamic: whether the scale adapts.
        growth_factor: factor applied after ``growth_interval`` clean steps (> 1).
        backoff_factor: factor applied on overflow (in (0, 1)).
        growth_interval: number of clean steps before growing (>= 1).
        min_scale: the scale never goes below this.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        *,
        dynamic: bool = True,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        min_scale: float = 1.0,
    ) -> None:
        if not init_scale > 0:
            raise ValueError(f"Invalid loss scale: {init_scale} (must be > 0)")
        if not growth_factor > 1.0:
            raise ValueError(f"Invalid growth_factor: {growth_factor} (must be > 1)")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"Invalid backoff_factor: {backoff_factor} (must be in (0, 1))")
        if growth_interval < 1:
            raise ValueError(f"Invalid growth_interval: {growth_interval} (must be >= 1)")
        if not min_scale > 0:
            raise ValueError(f"Invalid min_scale: {min_scale} (must be > 0)")
        self.scale = float(init_scale)
        self.dynamic = dynamic
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.clean_steps = 0
        self.overflows = 0

    @classmethod
    def from_spec(cls, spec: float | str | LossScaler | None) -> LossScaler | None:
        """Build a scaler from the ``loss_scale`` argument of the fused optimizers.

        ``None`` means no scaling, a number a static scale, ``"dynamic"`` a dynamic scaler with
        default settings, and a :class:`LossScaler` is used as given.
        """
        if spec is None or isinstance(spec, LossScaler):
            return spec
        if isinstance(spec, str):
            if spec != "dynamic":
                raise ValueError(f"Invalid loss_scale: {spec!r} (use None, a number or 'dynamic')")
            return cls(dynamic=True)
        if isinstance(spec, bool) or not isinstance(spec, (int, float)):
            raise ValueError(f"Invalid loss_scale: {spec!r} (use None, a number or 'dynamic')")
        return cls(float(spec), dynamic=False)

    def update(self, overflow: bool) -> None:
        """Record the outcome of one optimizer step and adapt the scale."""
        if not self.dynamic:
            return
        if overflow:
            self.overflows += 1
            self.clean_steps = 0
            self.scale = max(self.min_scale, self.scale * self.backoff_factor)
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, float | int | bool]:
        return {
            "scale": self.scale,
            "dynamic": self.dynamic,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "min_scale": self.min_scale,
            "clean_steps": self.clean_steps,
            "overflows": self.overflows,
        }

    def load_state_dict(self, state: dict[str, float | int | bool]) -> None:
        for key in self.state_dict():
            setattr(self, key, state[key])

    def __repr__(self) -> str:
        kind = "dynamic" if self.dynamic else "static"
        return f"LossScaler({kind}, scale={self.scale:g})"


def _stochastic_round_bf16(x: Tensor, generator: torch.Generator | None) -> Tensor:
    # bf16 is the upper half of an fp32 bit pattern. Adding a uniform 16-bit integer to the pattern
    # and truncating the low half rounds up with probability (low bits) / 2^16, i.e. exactly the
    # fractional distance to the upper neighbour; carries into the exponent are correct because
    # float bit patterns are monotonic in magnitude. Inf stays inf (its low bits are masked off).
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    noise.add_(bits).bitwise_and_(-65536)  # -65536 == 0xFFFF0000 as int32
    return noise.view(torch.float32).to(torch.bfloat16)


def _stochastic_round_generic(x: Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> Tensor:
    # Round to nearest, then move to the other neighbour with probability |err| / gap, which makes
    # the expectation exact: r + (err / gap) * gap = x.
    near = x.to(dtype)
    err = x - near.float()
    toward = torch.where(err > 0, float("inf"), float("-inf")).to(dtype)
    other = torch.nextafter(near, toward)
    gap = other.float().sub_(near.float())
    prob = err.div_(gap).nan_to_num_(0.0)
    u = torch.rand(x.shape, dtype=torch.float32, device=x.device, generator=generator)
    return torch.where(u < prob, other, near)


def stochastic_round(x: Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> Tensor:
    """Round an fp32 tensor to ``dtype`` (bf16 or fp16) stochastically and without bias.

    Args:
        x: fp32 tensor; it may be overwritten (it is used as scratch space).
        dtype: ``torch.bfloat16`` or ``torch.float16``; other dtypes are returned converted exactly.
        generator: random generator on ``x.device`` (seeded for reproducibility).
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round expects an fp32 tensor, got {x.dtype}")
    if dtype == torch.bfloat16:
        return _stochastic_round_bf16(x, generator)
    if dtype == torch.float16:
        return _stochastic_round_generic(x, dtype, generator)
    return x.to(dtype)


class WriteBack:
    """Applies an fp32 update to a parameter chunk and stores it with the chosen rounding.

    The optimizers call :meth:`apply` with a chunk of the parameter and a function that updates an
    fp32 tensor in place. For fp32 parameters the function runs on the parameter itself (no copy);
    below fp32 it runs on an fp32 copy of the chunk, which is then rounded back.

    Args:
        rounding: ``"nearest"``, ``"stochastic"`` or ``"kahan"``.
        generators: returns the random generator for a device (stochastic rounding only).
    """

    def __init__(
        self,
        rounding: str,
        generators: Callable[[torch.device], torch.Generator] | None = None,
    ) -> None:
        if rounding not in ROUNDING_MODES:
            raise ValueError(f"Invalid rounding: {rounding!r} (choose from {', '.join(ROUNDING_MODES)})")
        self.rounding = rounding
        self._generators = generators

    def needs_compensation(self, param: Tensor) -> bool:
        """Whether ``param`` needs a Kahan compensation buffer."""
        return self.rounding == "kahan" and param.dtype not in _EXACT_DTYPES

    def apply(
        self,
        chunk: Tensor,
        update: Callable[[Tensor], object],
        compensation: Tensor | None = None,
    ) -> None:
        """Run ``update`` on ``chunk`` in fp32 and store the result with the configured rounding.

        Args:
            chunk: a view of the parameter (any floating dtype); written in place.
            update: modifies an fp32 tensor in place (its return value is ignored).
            compensation: the Kahan buffer view matching ``chunk`` (``kahan`` mode only).
        """
        if chunk.dtype in _EXACT_DTYPES:
            update(chunk)
            return
        work = chunk.float()
        update(work)
        if self.rounding == "nearest":
            chunk.copy_(work)
        elif self.rounding == "stochastic":
            gen = self._generators(chunk.device) if self._generators is not None else None
            chunk.copy_(stochastic_round(work, chunk.dtype, gen))
        else:
            if compensation is None:
                raise RuntimeError("kahan rounding needs a compensation buffer")
            # y = (new - old) + c ; p' = round(old + y) ; c' = y - (p' - old)
            delta = work.sub_(chunk).add_(compensation)
            stored = chunk.float().add_(delta).to(chunk.dtype)
            compensation.copy_(delta.sub_(stored.float().sub_(chunk)))
            chunk.copy_(stored)
