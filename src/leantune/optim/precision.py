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
      for fp16 the two neighbours are computed explicitly. The optimizers read their random bits
      from a :class:`NoiseTable` (8 M uniform 16-bit values made once from the seed, read at a
      random offset drawn from the saved generator for each chunk): a quarter of the cost of
      drawing every value with ``randint``, and every element still gets a uniform draw.
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

__all__ = ["LossScaler", "NoiseTable", "Rounding", "WriteBack", "ROUNDING_MODES", "stochastic_round"]

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


NoiseSource = Callable[[int], Tensor]  # n -> n uniform integers in [0, 2^16), int32


def _randint_noise(device: torch.device, generator: torch.Generator | None) -> NoiseSource:
    def draw(n: int) -> Tensor:
        return torch.randint(0, 1 << 16, (n,), dtype=torch.int32, device=device, generator=generator)

    return draw


def _noise_for(n: int, noise: NoiseSource) -> Tensor:
    pieces = [noise(min(NoiseTable.MAX_DRAW, n - s)) for s in range(0, n, NoiseTable.MAX_DRAW)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _stochastic_round_bf16(x: Tensor, noise: NoiseSource) -> Tensor:
    # bf16 is the upper half of an fp32 bit pattern. Adding a uniform 16-bit integer to the pattern
    # and truncating the low half rounds up with probability (low bits) / 2^16, i.e. exactly the
    # fractional distance to the upper neighbour; carries into the exponent are correct because
    # float bit patterns are monotonic in magnitude. Inf stays inf (its low bits are masked off).
    bits = x.contiguous().view(torch.int32)
    flat = bits.view(-1)
    for start in range(0, flat.numel(), NoiseTable.MAX_DRAW):
        piece = flat[start : start + NoiseTable.MAX_DRAW]
        piece.add_(noise(piece.numel())).bitwise_and_(-65536)  # -65536 == 0xFFFF0000 as int32
    return bits.view(torch.float32).to(torch.bfloat16)


def _stochastic_round_generic(x: Tensor, dtype: torch.dtype, noise: NoiseSource) -> Tensor:
    # Round to nearest, then move to the other neighbour with probability |err| / gap, which makes
    # the expectation exact: r + (err / gap) * gap = x.
    near = x.to(dtype)
    err = x - near.float()
    toward = torch.where(err > 0, float("inf"), float("-inf")).to(dtype)
    other = torch.nextafter(near, toward)
    gap = other.float().sub_(near.float())
    prob = err.div_(gap).nan_to_num_(0.0)
    if not prob.numel():
        return near
    # u uniform in (0, 1) at 2^-16 resolution, midpoints: (k + 1/2) / 2^16.
    u = _noise_for(prob.numel(), noise).float().add_(0.5).mul_(1.0 / 65536).view(x.shape)
    return torch.where(u < prob, other, near)


def stochastic_round(
    x: Tensor,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
    *,
    noise: NoiseSource | None = None,
) -> Tensor:
    """Round an fp32 tensor to ``dtype`` (bf16 or fp16) stochastically and without bias.

    Args:
        x: fp32 tensor; it may be overwritten (it is used as scratch space).
        dtype: ``torch.bfloat16`` or ``torch.float16``; other dtypes are returned converted exactly.
        generator: random generator on ``x.device`` (seeded for reproducibility).
        noise: source of uniform 16-bit integers (e.g. a :class:`NoiseTable`); default:
            ``randint`` with ``generator``.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round expects an fp32 tensor, got {x.dtype}")
    source = noise if noise is not None else _randint_noise(x.device, generator)
    if dtype == torch.bfloat16:
        return _stochastic_round_bf16(x, source)
    if dtype == torch.float16:
        return _stochastic_round_generic(x, dtype, source)
    return x.to(dtype)


class NoiseTable:
    """Uniform 16-bit random integers for stochastic rounding, cheaper than drawing each one.

    A table of ``SIZE`` values is drawn once from ``seed`` (on the device); each request for ``n``
    values returns the slice at an offset drawn from ``generator``. Every element therefore gets a
    uniform value independent of its own (so rounding stays unbiased), draws in different calls
    are independent unless two offsets coincide, and the whole sequence is reproducible from the
    seed and the generator state (which the optimizers save). 32 MiB per device, made once.
    """

    SIZE = 1 << 23
    MAX_DRAW = 1 << 22  # offsets range over SIZE - MAX_DRAW + 1 >= 4 M positions

    def __init__(self, seed: int, device: torch.device, generator: torch.Generator) -> None:
        table_gen = torch.Generator(device=device)
        table_gen.manual_seed((seed * 2_654_435_761 + 12345) % (1 << 63))
        self.table = torch.randint(
            0, 1 << 16, (self.SIZE,), dtype=torch.int32, device=device, generator=table_gen
        )
        self.generator = generator

    def __call__(self, n: int) -> Tensor:
        if n > self.MAX_DRAW:
            raise ValueError(f"at most {self.MAX_DRAW} values per draw, asked for {n}")
        offset = torch.randint(
            0, self.SIZE - n + 1, (1,), generator=self.generator, device=self.generator.device
        )
        start = int(offset)
        return self.table[start : start + n]


class WriteBack:
    """Applies an fp32 update to a parameter chunk and stores it with the chosen rounding.

    The optimizers call :meth:`apply` with a chunk of the parameter and a function that updates an
    fp32 tensor in place. For fp32 parameters the function runs on the parameter itself (no copy);
    below fp32 it runs on an fp32 copy of the chunk, which is then rounded back.

    Args:
        rounding: ``"nearest"``, ``"stochastic"`` or ``"kahan"``.
        generators: returns the random generator for a device (stochastic rounding only).
        seed: returns the seed of the stochastic-rounding noise table.
    """

    def __init__(
        self,
        rounding: str,
        generators: Callable[[torch.device], torch.Generator] | None = None,
        seed: Callable[[], int] | None = None,
    ) -> None:
        if rounding not in ROUNDING_MODES:
            raise ValueError(f"Invalid rounding: {rounding!r} (choose from {', '.join(ROUNDING_MODES)})")
        self.rounding = rounding
        self._generators = generators
        self._seed = seed
        self._tables: dict[str, NoiseTable] = {}

    def noise(self, device: torch.device) -> NoiseSource:
        """The noise source of ``device``: on the CPU a :class:`NoiseTable` made on first use from
        the seed (cheaper than drawing every value); on an accelerator ``randint`` with the
        device's generator, which costs about what reading the table does there and, unlike the
        table's offset, never waits for the device (one host sync per chunk would serialise the
        update)."""
        gen = self._generators(device) if self._generators is not None else None
        if gen is None or device.type != "cpu":
            return _randint_noise(device, gen)
        key = str(device)
        table = self._tables.get(key)
        if table is None or table.generator is not gen:
            table = NoiseTable(self._seed() if self._seed is not None else 0, device, gen)
            self._tables[key] = table
        return table

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
            chunk.copy_(stochastic_round(work, chunk.dtype, noise=self.noise(chunk.device)))
        else:
            if compensation is None:
                raise RuntimeError("kahan rounding needs a compensation buffer")
            # Kahan: y = (new - old) + c, p' = round(old + y), c' = y - (p' - old). Since
            # old + y = new + c, this is p' = round(new + c), c' = (new + c) - p': four passes.
            work.add_(compensation)
            stored = work.to(chunk.dtype)
            compensation.copy_(work.sub_(stored))
            chunk.copy_(stored)
