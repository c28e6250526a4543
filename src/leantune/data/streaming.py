"""Training from JSON-lines files larger than memory: records are read and tokenised on the fly by
a worker thread, shuffled through a buffer, and the stream resumes at the exact sample.

Memory is the shuffle buffer (``data.shuffle_buffer`` samples) and a short queue of encoded
samples, whatever the size of the files. The lines of the files are numbered in order; rank ``r``
of ``n`` takes the lines ``i`` with ``i % n == r``, after the first ``skip`` lines (held out for
evaluation). Each pass over the files ("epoch") shuffles with its own seed.

The checkpointed state is the consumer's: the epoch, the byte offset and number of the next line
to enter the buffer, the buffer's samples, the shuffle generator's state and the partial text
sequence being packed. A resumed stream seeks to that offset and continues exactly as the
uninterrupted one would have.
"""

from __future__ import annotations

import json
import queue
import random
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from leantune.data.encode import EncodeStats, Sample, encode_records
from leantune.data.formats import KINDS, prepare_records
from leantune.data.loader import collate
from leantune.data.records import DataError

__all__ = ["StreamingStream", "count_lines", "heldout_records"]

_END = object()


def count_lines(paths: Sequence[str]) -> int:
    """Non-empty lines of the files (records, for a well-formed JSON-lines file), read in blocks."""
    total = 0
    for p in paths:
        with open(p, "rb") as fh:
            for line in fh:
                total += bool(line.strip())
    return total


class StreamingStream:
    """An endless, resumable stream of training batches read from JSON-lines ``paths``.

    Args:
        paths: the files, read in this order.
        fmt, columns: the data format (``"auto"``: from the first record) and field renames.
        tokenizer: encodes the records.
        max_length, overlong, pack: as for :func:`leantune.data.encode.encode_records`; text is
            packed across records when ``pack``.
        batch_size, pad_id, seed, rank, world_size: as for :class:`BatchStream`.
        buffer_size: samples in the shuffle buffer.
        skip: the first records of the stream, held out (evaluation).
    """

    def __init__(
        self,
        paths: Sequence[str],
        fmt: str,
        columns: dict[str, str] | None,
        tokenizer: Any,
        *,
        max_length: int,
        overlong: str = "truncate",
        pack: bool = True,
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        buffer_size: int = 1000,
        skip: int = 0,
    ) -> None:
        self.paths = [str(p) for p in paths]
        for p in self.paths:
            if Path(p).suffix.lower() != ".jsonl":
                raise DataError(f"{p}: data.streaming reads JSON-lines files (.jsonl) only")
        self.columns, self.tokenizer = columns or {}, tokenizer
        self.fmt = self._first_format(fmt)
        self.kind = KINDS[self.fmt]
        if self.kind == "preference":
            raise DataError(f"{self.paths[0]}: preference records are not trained by supervised fine-tuning")
        self.max_length, self.overlong, self.pack = max_length, overlong, pack
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.rank, self.world_size = rank, world_size
        self.buffer_size, self.skip = buffer_size, skip
        lines = count_lines(self.paths) - skip
        self.batches_per_epoch = max(1, lines // world_size // batch_size)
        self.lines_per_epoch = max(1, lines)
        self.stats = EncodeStats()
        # the consumer's position (what a checkpoint holds)
        self.epoch = 0
        self.next_line = 0  # number of the next line to enter the buffer (over all files)
        self.next_offset = (0, 0)  # (file index, byte offset) of that line
        self.buffer: list[Sample] = []
        self.carry: list[int] = []  # text being packed into the next sequence
        self._rng = random.Random(f"{seed}:{rank}:0")
        self._producer: _Producer | None = None

    def _first_format(self, fmt: str) -> str:
        if fmt != "auto":
            return fmt
        with open(self.paths[0], "rb") as fh:
            for n, raw in enumerate(fh, start=1):
                if raw.strip():
                    record = json.loads(raw)
                    return prepare_records([record], [f"{self.paths[0]}:{n}"], "auto", self.columns)[1]
        raise DataError(f"{self.paths[0]}: the file has no records (it is empty)")

    # ------------------------------------------------------------------------------- producer
    def _lines(self, start: tuple[int, int], number: int) -> Iterator[tuple[int, tuple[int, int], str, str]]:
        """(line number, offset of the next line, location, text) of this rank's lines from ``start``."""
        file_index, offset = start
        for fi in range(file_index, len(self.paths)):
            with open(self.paths[fi], "rb") as fh:
                fh.seek(offset if fi == file_index else 0)
                while True:
                    raw = fh.readline()
                    if not raw:
                        break
                    if not raw.strip():
                        continue
                    here = number
                    number += 1
                    if here < self.skip or (here - self.skip) % self.world_size != self.rank:
                        continue
                    yield here, (fi, fh.tell()), f"{self.paths[fi]} record {here + 1}", raw.decode("utf-8")
            offset = 0

    def _encode(self, loc: str, text: str, carry: list[int]) -> tuple[list[Sample], list[int]]:
        """The samples of one line, and the text still waiting to fill a packed sequence."""
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{loc}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{loc}: expected a JSON object, got {type(record).__name__}")
        records, _ = prepare_records([record], [loc], self.fmt, self.columns)
        if self.kind == "text" and self.pack:
            return self._pack_text(records[0]["text"], carry)
        try:
            samples, st = encode_records(records, [loc], self.fmt, self.tokenizer, max_length=self.max_length,
                                         overlong=self.overlong, pack=False)  # fmt: skip
        except DataError:  # a record with nothing to learn: counted, skipped
            self.stats.dropped_no_labels += 1
            return [], carry
        self.stats.truncated += st.truncated
        return samples, carry

    def _pack_text(self, text: str, carry: list[int]) -> tuple[list[Sample], list[int]]:
        eos = self.tokenizer.eos_token_id
        carry = carry + list(self.tokenizer(text, add_special_tokens=True)["input_ids"]) + [eos]
        out = []
        while len(carry) >= self.max_length:
            chunk, carry = carry[: self.max_length], carry[self.max_length :]
            out.append(Sample(chunk, list(chunk)))
        return out, carry

    # ------------------------------------------------------------------------------- consumer
    def _start(self) -> None:
        self._producer = _Producer(self, self.next_offset, self.next_line, list(self.carry))

    def _fill(self) -> bool:
        """Move samples from the producer into the buffer until it is full; False at the end of
        the files."""
        if self._producer is None:
            self._start()
        assert self._producer is not None
        while len(self.buffer) < self.buffer_size:
            if self._producer.done:
                return False
            item = self._producer.get()
            if item is _END:
                self._producer.done = True
                return False
            line, offset, samples, carry = item
            self.buffer += samples
            self.next_line, self.next_offset, self.carry = line + 1, offset, carry
        return True

    def _next_sample(self) -> Sample:
        for _ in range(3):
            more = self._fill()
            if self.buffer:
                j = self._rng.randrange(len(self.buffer))
                self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
                return self.buffer.pop()
            if not more:  # files and buffer exhausted: the next pass, shuffled anew
                self.close()
                self.epoch += 1
                self.next_line, self.next_offset, self.carry = 0, (0, 0), []
                self._rng = random.Random(f"{self.seed}:{self.rank}:{self.epoch}")
        raise DataError(f"{self.paths[0]}: no training samples in the stream (every record was dropped)")

    def next_batch(self) -> dict[str, torch.Tensor]:
        return collate([self._next_sample() for _ in range(self.batch_size)], self.pad_id)

    @property
    def epoch_progress(self) -> float:
        return self.epoch + min(1.0, max(0, self.next_line - self.skip) / self.lines_per_epoch)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.stop()
            self._producer = None

    def state_dict(self) -> dict[str, Any]:
        lengths = [len(s.input_ids) for s in self.buffer]
        return {
            "kind": "streaming",
            "paths": list(self.paths),
            "epoch": self.epoch,
            "next_line": self.next_line,
            "next_offset": list(self.next_offset),
            "buffer_ids": torch.tensor([t for s in self.buffer for t in s.input_ids], dtype=torch.int32),
            "buffer_labels": torch.tensor([t for s in self.buffer for t in s.labels], dtype=torch.int32),
            "buffer_lengths": lengths,
            "carry": list(self.carry),
            "rng": self._rng.getstate(),
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "streaming" or state.get("paths") != self.paths:
            raise DataError(
                f"the checkpoint's data position is for {state.get('paths', 'in-memory data')}, this run "
                f"streams {self.paths}: resume with the same data.train"
            )
        self.close()
        self.epoch, self.next_line = int(state["epoch"]), int(state["next_line"])
        self.next_offset = (int(state["next_offset"][0]), int(state["next_offset"][1]))
        ids, labels = state["buffer_ids"].tolist(), state["buffer_labels"].tolist()
        self.buffer, at = [], 0
        for n in state["buffer_lengths"]:
            self.buffer.append(Sample(ids[at : at + n], [int(x) for x in labels[at : at + n]]))
            at += n
        self.carry = list(state["carry"])
        rng_state = state["rng"]
        self._rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))
        self.seed = int(state["seed"])


class _Producer:
    """A thread that reads and encodes lines into a bounded queue (so memory stays constant)."""

    def __init__(
        self, stream: StreamingStream, start: tuple[int, int], number: int, carry: list[int]
    ) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=max(4, 2 * stream.batch_size))
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self.done = False  # the end of the files was taken by the consumer
        self.thread = threading.Thread(target=self._run, args=(stream, start, number, carry), daemon=True)
        self.thread.start()

    def _run(self, stream: StreamingStream, start: tuple[int, int], number: int, carry: list[int]) -> None:
        try:
            for line, offset, loc, text in stream._lines(start, number):
                samples, carry = stream._encode(loc, text, carry)
                item = (line, offset, samples, carry)
                while not self.halt.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.halt.is_set():
                    return
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            self.error = err
        self._put_end()

    def _put_end(self) -> None:
        while not self.halt.is_set():
            try:
                self.queue.put(_END, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self) -> Any:
        while True:
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    item = _END
                else:
                    continue
            if item is _END and self.error is not None:
                raise self.error
            return item

    def stop(self) -> None:
        self.halt.set()
        self.thread.join(timeout=5)


def heldout_records(paths: Sequence[str], n: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The first ``n`` records of the stream (what the training stream skips)."""
    out, where = [], []
    for p in paths:
        with open(p, "rb") as fh:
            for raw in fh:
                if len(out) >= n:
                    return out, where
                if raw.strip():
                    out.append(json.loads(raw))
                    where.append(f"{p} record {len(out)}")
    return out, where
