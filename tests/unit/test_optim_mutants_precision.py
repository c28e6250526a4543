"""leantune.optim.precision's noise table, noise sources and write-back against their documented
definitions, written out here (survivors of mutmut)."""

from __future__ import annotations

import pytest
import torch

from leantune.optim.precision import NoiseTable, WriteBack, stochastic_round

CPU = torch.device("cpu")


def _documented_table(seed: int) -> torch.Tensor:
    """The table as documented: SIZE uniform 16-bit int32 values from a generator seeded with
    (seed * 2654435761 + 12345) mod 2^63 (decorrelated from the offset generator's own seed)."""
    g = torch.Generator().manual_seed((seed * 2_654_435_761 + 12345) % (1 << 63))
    return torch.randint(0, 1 << 16, (NoiseTable.SIZE,), dtype=torch.int32, generator=g)


@pytest.mark.parametrize("seed", [0, 7, 2**63])  # 2**63: the hash must stay a valid seed
def test_the_noise_table_is_drawn_from_the_documented_seed_hash(seed):
    """Runs resumed from a checkpoint rebuild the table from the seed: it must stay this one."""
    table = NoiseTable(seed, CPU, torch.Generator()).table
    assert table.dtype == torch.int32
    assert torch.equal(table, _documented_table(seed))


def test_the_noise_table_holds_every_16_bit_value_from_0_to_65535():
    table = NoiseTable(3, CPU, torch.Generator()).table
    assert int(table.min()) == 0 and int(table.max()) == (1 << 16) - 1
    assert torch.bincount(table.long(), minlength=1 << 16).count_nonzero() == 1 << 16


class _SmallTable(NoiseTable):
    SIZE = 8
    MAX_DRAW = 4


def _offset(table: NoiseTable, n: int) -> int:
    piece = table(n)
    assert piece.dtype == torch.int32 and piece.numel() == n
    start = (piece.data_ptr() - table.table.data_ptr()) // table.table.element_size()
    assert torch.equal(piece, table.table[start : start + n])
    return start


@pytest.mark.parametrize("n", [1, 4])
def test_draws_start_at_every_offset_that_leaves_n_values_and_no_other(n):
    table = _SmallTable(0, CPU, torch.Generator().manual_seed(1))
    offsets = [_offset(table, n) for _ in range(400)]
    assert set(offsets) == set(range(_SmallTable.SIZE - n + 1))


def test_a_draw_larger_than_max_draw_is_refused_with_both_sizes():
    table = _SmallTable(0, CPU, torch.Generator())
    with pytest.raises(ValueError, match="^at most 4 values per draw, asked for 5$"):
        table(5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stochastic_round_to_a_dtype_without_rounding_converts_exactly(dtype):
    x = torch.tensor([1.0 + 2**-20, -3.25e-30, 7.0])
    out = stochastic_round(x.clone(), dtype, torch.Generator())
    assert out.dtype == dtype
    assert out.tolist() == x.tolist()


def _expected_bf16(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The bf16 bit trick in plain integer arithmetic: add the 16-bit noise, truncate."""
    bits = [int(v) for v in x.view(torch.int32)]
    out = [((b + int(u)) & -65536) for b, u in zip(bits, noise)]
    return torch.tensor(out, dtype=torch.int32).view(torch.float32).to(torch.bfloat16)


def test_write_back_without_generators_rounds_with_fresh_randint_noise():
    """No generator factory: stochastic rounding still works, drawing from torch's global RNG."""
    wb = WriteBack("stochastic")
    x = torch.tensor([1.0 + 2**-9, -2.0 - 2**-10, 3.0 + 3 * 2**-10], dtype=torch.float32)
    chunk = torch.zeros(3, dtype=torch.bfloat16)
    torch.manual_seed(11)
    noise = torch.randint(0, 1 << 16, (3,), dtype=torch.int32)
    torch.manual_seed(11)
    wb.apply(chunk, lambda w: w.copy_(x))
    assert torch.equal(chunk, _expected_bf16(x, noise))
    source = wb.noise(CPU)
    draw = source(5)
    assert draw.dtype == torch.int32 and draw.shape == (5,)
    assert 0 <= int(draw.min()) <= int(draw.max()) < 1 << 16


def test_write_back_builds_its_table_from_the_seed_it_is_given():
    gen = torch.Generator()
    table = WriteBack("stochastic", lambda device: gen, lambda: 5).noise(CPU)
    assert table.generator is gen and torch.equal(table.table, _documented_table(5))


def test_write_back_without_a_seed_builds_the_table_of_seed_zero():
    gen = torch.Generator()
    table = WriteBack("stochastic", lambda device: gen).noise(CPU)
    assert table.generator is gen and torch.equal(table.table, _documented_table(0))


def test_kahan_without_a_compensation_buffer_is_refused_by_name():
    wb = WriteBack("kahan")
    with pytest.raises(RuntimeError, match="^kahan rounding needs a compensation buffer$"):
        wb.apply(torch.zeros(2, dtype=torch.bfloat16), lambda w: w.add_(1.0))


def test_the_noise_is_a_table_on_the_cpu_and_randint_of_the_device_generator_elsewhere(device):
    gen = torch.Generator(device=device).manual_seed(4)
    source = WriteBack("stochastic", lambda d: gen, lambda: 5).noise(device)
    if device.type == "cpu":
        assert isinstance(source, NoiseTable) and source.generator is gen
        return
    # On CUDA the table's offset would need a host sync per chunk: randint draws on the device.
    assert not isinstance(source, NoiseTable)
    expected = torch.randint(
        0, 1 << 16, (7,), dtype=torch.int32, device=device,
        generator=torch.Generator(device=device).manual_seed(4),
    )  # fmt: skip
    assert torch.equal(source(7), expected)
