"""A virtual clock: each model forward advances time by a configured (or profiled) cost.

On two shared CPU cores wall-clock time says little about a CPU-draft + GPU-target deployment; the
virtual clock replays the *schedule* instead. A forward of ``n`` tokens on lane ``L`` costs
``per_forward[L] + per_token[L] * n`` seconds. Lanes run concurrently; :meth:`VirtualClock.sync`
is a join (every lane waits for the slowest), so a sequential algorithm (plain or standard
speculative decoding) syncs after every phase and a parallel one (DuoDecoding) once per round:

    round time (sequential) = sum of all forwards,   round time (duo) = max(draft lane, target lane).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["AnyClock", "ClockSet", "Cost", "VirtualClock"]


@dataclass(frozen=True)
class Cost:
    """The virtual cost of a forward: ``per_forward + per_token * n_tokens`` seconds."""

    per_forward: float
    per_token: float = 0.0

    def of(self, n_tokens: int) -> float:
        return self.per_forward + self.per_token * n_tokens


@dataclass
class VirtualClock:
    """Per-lane virtual time (seconds); ``costs`` maps a lane name (``draft``, ``target``) to a :class:`Cost`.

    >>> c = VirtualClock({"draft": Cost(1.0), "target": Cost(10.0)})
    >>> c.charge("draft", 1); c.charge("draft", 1); c.charge("target", 3); c.sync()
    10.0
    """

    costs: dict[str, Cost]
    lanes: dict[str, float] = field(default_factory=dict)

    @classmethod
    def ratio(cls, target_over_draft: float, draft_cost: float = 1e-3) -> VirtualClock:
        """A clock where a target forward costs ``target_over_draft`` draft forwards."""
        return cls({"draft": Cost(draft_cost), "target": Cost(draft_cost * target_over_draft)})

    def charge(self, lane: str, n_tokens: int = 1) -> None:
        """Advance ``lane`` by the cost of one forward over ``n_tokens`` tokens."""
        self.lanes[lane] = self.lanes.get(lane, 0.0) + self.costs[lane].of(n_tokens)

    def sync(self) -> float:
        """Join: every lane moves to the latest one; returns that time."""
        now = self.now
        for lane in self.costs:
            self.lanes[lane] = now
        return now

    @property
    def now(self) -> float:
        return max([0.0, *self.lanes.values()])


@dataclass
class ClockSet:
    """Several :class:`VirtualClock` advanced together: one run priced at several cost ratios (the
    decoding schedule does not depend on time, so one run serves all). Behaves as its first clock;
    ``marks`` keeps every clock's time at each read of :attr:`now` (the loops read it at the first
    token and at the end, so ``marks[0]`` is the TTFT and ``marks[-1]`` the total)."""

    clocks: list[VirtualClock]
    marks: list[list[float]] = field(default_factory=list)

    def charge(self, lane: str, n_tokens: int = 1) -> None:
        for c in self.clocks:
            c.charge(lane, n_tokens)

    def sync(self) -> float:
        return [c.sync() for c in self.clocks][0]

    @property
    def now(self) -> float:
        self.marks.append([c.now for c in self.clocks])
        return self.marks[-1][0]


AnyClock = VirtualClock | ClockSet
