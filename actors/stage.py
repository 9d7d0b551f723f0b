"""StageActor: runs CPU-heavy pipeline stages (zstd, AES-GCM, custom) off the producers.

A plain class (testable without Ray); ``athomic.actors.topology`` makes a pool of them per
connection (``<connection>.stage.<i>``). ``StagePool`` is the ProducerActor's side: it
splits a batch over the pool, one call per replica, and puts the results back in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from athomic.errors import PipelineError
from athomic.pipeline import Pipeline, StageWork
from athomic.settings import MessagingSettings


class StageActor:
    """Encodes batches through the stages placed on actors.

    Guarantees: a call is a pure function of its input (plus fresh random nonces), so a call
    retried after an actor restart is safe; nothing is sent from here. A message whose stage
    fails comes back as its PipelineError, so one bad message does not hide the others.
    """

    def __init__(self, settings: MessagingSettings, index: int = 0) -> None:
        self.index = index
        self.pipeline = Pipeline.from_settings(settings)
        self._fingerprint = settings.fingerprint()
        self._calls = 0
        self._messages = 0

    def encode(self, segment: int, batch: list[StageWork]) -> list[StageWork | PipelineError]:
        """Run segment ``segment`` of the pipeline (a run of actor-placed stages) over
        ``batch``."""
        self._calls += 1
        self._messages += len(batch)
        return self.pipeline.run_segment(segment, batch)

    def fingerprint(self) -> str:
        return self._fingerprint

    def stats(self) -> dict[str, Any]:
        import os

        return {"index": self.index, "calls": self._calls, "messages": self._messages,
                "pid": os.getpid()}

    def stop(self) -> None:
        """Nothing to flush; present so teardown treats every actor alike."""


class StagePool:
    """The ProducerActor's StageRunner: one call per replica per batch segment.

    A batch is cut into contiguous chunks, one per replica (fewer when the batch is
    smaller), starting at a rotating replica so single-message publishes spread too.
    """

    def __init__(self, actors: Sequence[Any]) -> None:
        if not actors:
            raise ValueError("a StagePool needs at least one StageActor")
        self._actors = list(actors)
        self._next = 0

    async def run(self, segment: int, batch: list[StageWork]
                  ) -> list[StageWork | PipelineError]:
        import ray

        n = min(len(self._actors), len(batch))
        size, extra = divmod(len(batch), n)
        chunks, start = [], 0
        for j in range(n):
            end = start + size + (1 if j < extra else 0)
            chunks.append(batch[start:end])
            start = end
        first, self._next = self._next, (self._next + n) % len(self._actors)
        refs = [self._actors[(first + j) % len(self._actors)].encode.remote(segment, chunk)
                for j, chunk in enumerate(chunks)]
        try:
            parts = await asyncio.gather(*refs)
        except ray.exceptions.RayError as exc:
            # The one place Ray errors of the stage pool become athomic errors.
            raise PipelineError(f"stage actor call failed: {type(exc).__name__}: {exc}",
                                stage="stage-actor") from None
        return [out for part in parts for out in part]
