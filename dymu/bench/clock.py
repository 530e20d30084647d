"""Stage timing for one generation: CUDA events on the GPU (read after one synchronize at the
end), perf_counter on the CPU, and host timestamps only where the host really has the result.

Why events: a CPU timestamp taken while the GPU is still busy measures when work was queued,
not when it finished (the flaw of the logits-processor timestamps this replaces). Events are
recorded in the stream at each stage edge and at every decode step; TTFT is a host time taken
after synchronising on the first generated token, because that is what a user waits for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor


@dataclass
class StageClock:
    """Named stage edges on one device, plus host-side times (seconds since `start`)."""

    device: torch.device
    edges: dict[str, object] = field(default_factory=dict)
    steps: list[object] = field(default_factory=list)
    host: dict[str, float] = field(default_factory=dict)
    t0: float = 0.0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        """The sample starts (host): everything after, preprocessing included, is its latency."""
        self.sync()
        self.t0 = time.perf_counter()

    def host_mark(self, name: str) -> None:
        """A host time after synchronising (the host really has the result here)."""
        self.sync()
        self.host[name] = time.perf_counter() - self.t0

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self, name: str) -> None:
        """A stage edge in the device's stream (no synchronisation)."""
        self.edges[name] = self._now()

    def step(self) -> None:
        """One decode step's logits are computed (called by `StepRecorder`)."""
        self.steps.append(self._now())

    def _ms(self, a: object, b: object) -> float:
        if self.cuda:
            return float(a.elapsed_time(b))  # type: ignore[attr-defined]
        return (float(b) - float(a)) * 1e3  # type: ignore[arg-type]

    def between(self, a: str, b: str) -> float:
        """Milliseconds between two stage edges (call after the final synchronize)."""
        return self._ms(self.edges[a], self.edges[b])

    def step_gaps(self) -> list[float]:
        """Milliseconds between consecutive decode steps: the inter-token latencies."""
        return [self._ms(a, b) for a, b in zip(self.steps, self.steps[1:], strict=False)]

    def first_step_ms(self, after: str) -> float | None:
        """Milliseconds from a stage edge to the first decode step's logits."""
        return self._ms(self.edges[after], self.steps[0]) if self.steps else None


class StepRecorder(LogitsProcessor):
    """Marks each decode step in the stream; on the first one, synchronises and takes the host
    time to first token (one sync per generation, at the point TTFT is defined)."""

    def __init__(self, clock: StageClock) -> None:
        self.clock = clock

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.clock.step()
        if len(self.clock.steps) == 1:
            self.clock.host_mark("first_token")
        return scores
