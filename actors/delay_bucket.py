"""DelayBucketActor: runs the republish loop of one delay topic (one replica of it).

A plain class; ``athomic.actors.topology`` makes it a named, detached Ray actor, spread
over the cluster's nodes and restarted by Ray without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from athomic._kafka import AIOKAFKA, KafkaClients
from athomic._process import OLD_THRESHOLD, gc_stats, settle_gc
from athomic.errors import AthomicError, ConfigurationError, MessagingConnectionError
from athomic.republisher.loop import BucketRepublisher
from athomic.settings import MessagingSettings

log = logging.getLogger("athomic.republisher")

MAX_FAILED_STARTS = 5
"""Consecutive failures of the loop after which a Ray actor exits, so Ray restarts it."""


class DelayBucketActor:
    """Delivers the delayed messages of one delay topic (the partitions of one replica).

    Guarantees: a message is never delivered before its due time; delivery to the final
    topic is exactly once for read_committed consumers, across crashes, restarts and
    layout changes (a transaction per partition with the consumed offsets, under a
    transactional id per partition: a new holder fences the old); a message id is released
    once within ``republisher.dedupe_window_s``; at-least-once for other consumers, always
    with the original message id. Retries: a failed transaction is retried with backoff; a
    failing message goes to the dead-letter topic after bounded attempts; offsets never
    move past an unpublished message. The loop starts in the constructor, so an actor
    restarted by Ray resumes on its own; a loop that cannot go on (failing to start again
    and again, or stuck) ends the actor's process so Ray restarts it.
    """

    def __init__(self, settings: MessagingSettings, topic: str, replica: int = 0,
                 replicas: int = 1, *, generation: int = 0, autostart: bool = True,
                 clients: KafkaClients = AIOKAFKA, own_process: bool = False) -> None:
        self.settings = settings
        self.republisher = BucketRepublisher(settings, topic, replica, replicas,
                                             generation=generation, clients=clients)
        self._fingerprint = settings.fingerprint()
        self._error: AthomicError | None = None
        self._restarts = 0
        self._started = time.time()
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.exit_on_failure = autostart  # a Ray actor: Ray restarts what exits
        if own_process:  # a Ray actor: the process is this actor's alone
            settle_gc(young_threshold=None, old_threshold=OLD_THRESHOLD)
        if autostart:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self.run_forever())
            self._watchdog = loop.create_task(self._watch())

    async def run_forever(self) -> None:
        """Start, run, and on a failure start again from the committed progress."""
        backoff = 0.5
        failures = 0
        rep = self.republisher
        while not rep.stopping:
            try:
                await rep.start()
                self._error = None
                backoff, failures = 0.5, 0
                await rep.run()
            except ConfigurationError as exc:  # e.g. retention too short: needs a human
                self._error = exc
                log.error("republisher %s cannot start: %s", rep.topic, exc)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._restarts += 1
                failures += 1
                if isinstance(exc, MessagingConnectionError):
                    self._error = exc
                log.warning("republisher %s failed (%r); restarting in %.1fs", rep.topic,
                            exc, backoff)
                if failures >= MAX_FAILED_STARTS:
                    self._give_up(f"failed {failures} times in a row: {exc!r}")
            finally:
                await rep.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _watch(self) -> None:
        """A loop that stops turning (a wait that escaped every bound) ends the process."""
        limit = 2 * self.settings.republisher.ack_timeout_s + 60
        while not self.republisher.stopping:
            await asyncio.sleep(5)
            rep = self.republisher
            if rep.running and time.monotonic() - rep.heartbeat > limit:
                self._give_up(f"the republish loop has not turned for {limit:.0f}s")

    def _give_up(self, why: str) -> None:
        log.error("republisher %s: %s", self.republisher.topic, why)
        if self.exit_on_failure:
            os._exit(1)  # Ray restarts the actor in a fresh process

    async def ready(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Wait until each partition of this replica is claimed; raise the start error as
        soon as the loop failed with it (ConfigurationError for a topic that would lose
        data or is owned by another connection, MessagingConnectionError when the brokers
        cannot be reached: the loop keeps retrying, but the caller learns it now rather
        than at the end of ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        rep = self.republisher
        while True:
            if self._error is not None:
                raise self._error
            refused = rep.refused()
            if refused:
                raise ConfigurationError(
                    f"delay topic {rep.topic!r}: partitions {'; '.join(refused)}")
            if rep.ready():
                return await self.stats()
            if time.monotonic() >= deadline:
                raise MessagingConnectionError(
                    f"republisher for {rep.topic!r} not running after {timeout_s}s "
                    f"(brokers at {self.settings.bootstrap_servers})")
            await asyncio.sleep(0.05)

    async def stats(self) -> dict[str, Any]:
        stats = self.republisher.stats()
        stats.update(restarts=self._restarts, error=str(self._error) if self._error else None,
                     node_id=_node_id(), pid=os.getpid(),
                     uptime_s=round(time.time() - self._started, 1), **gc_stats())
        return stats

    async def fingerprint(self) -> str:
        return self._fingerprint

    async def stop(self) -> None:
        """Stop after the current transactions; held messages stay in Kafka, uncommitted."""
        self.republisher.stop()
        for task in (self._task, self._watchdog):
            if task is not None:
                if task is self._watchdog:
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, 30)
        await self.republisher.close()
        await asyncio.to_thread(self.republisher.telemetry.shutdown)

    async def flush_telemetry(self) -> None:
        """Export the spans and metrics this actor holds now (with an exporter set)."""
        await asyncio.to_thread(self.republisher.telemetry.flush)


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
