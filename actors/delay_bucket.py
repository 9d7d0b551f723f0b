"""DelayBucketActor: runs the republish loop of one delay topic (one replica of it).

A plain class; ``athomic.actors.topology`` makes it a named, detached Ray actor, spread
over the cluster's nodes and restarted by Ray without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from athomic._kafka import AIOKAFKA, KafkaClients
from athomic.errors import AthomicError, ConfigurationError, MessagingConnectionError
from athomic.republisher.loop import BucketRepublisher, Fenced
from athomic.settings import MessagingSettings

log = logging.getLogger("athomic.republisher")


class DelayBucketActor:
    """Delivers the delayed messages of one delay topic (the partitions of one replica).

    Guarantees: a message is never delivered before its due time; delivery to the final
    topic is exactly once for read_committed consumers, across crashes and restarts
    (transactions with the consumed offsets, a transactional id stable per replica so a
    restarted replica fences its predecessor); at-least-once for other consumers, always
    with the original message id. Retries: a failed transaction is retried with backoff;
    offsets never move past an unpublished message. The loop starts in the constructor, so
    an actor restarted by Ray resumes on its own.
    """

    def __init__(self, settings: MessagingSettings, topic: str, replica: int = 0,
                 replicas: int = 1, *, autostart: bool = True,
                 clients: KafkaClients = AIOKAFKA) -> None:
        self.settings = settings
        self.republisher = BucketRepublisher(settings, topic, replica, replicas,
                                             clients=clients)
        self._fingerprint = settings.fingerprint()
        self._ready = asyncio.Event()
        self._error: AthomicError | None = None
        self._fenced = False
        self._restarts = 0
        self._task: asyncio.Task[None] | None = None
        if autostart:
            self._task = asyncio.get_running_loop().create_task(self.run_forever())

    async def run_forever(self) -> None:
        """Start, run, and on a failure start again from the committed progress."""
        backoff = 0.5
        while not self.republisher.stopping:
            try:
                await self.republisher.start()
                self._error = None
                self._ready.set()
                backoff = 0.5
                await self.republisher.run()
            except ConfigurationError as exc:  # e.g. retention too short: needs a human
                self._error = exc
                self._ready.set()
                log.error("republisher %s cannot start: %s", self.republisher.topic, exc)
                return
            except Fenced:
                self._fenced = True
                log.warning("republisher %s replica %d fenced by a newer instance",
                            self.republisher.topic, self.republisher.replica)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._restarts += 1
                if isinstance(exc, MessagingConnectionError):
                    self._error = exc
                log.warning("republisher %s failed (%r); restarting in %.1fs",
                            self.republisher.topic, exc, backoff)
            finally:
                await self.republisher.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def ready(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Wait until the loop runs; raise the start error (ConfigurationError for a topic
        that would lose data, MessagingConnectionError when the brokers stay away)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ready.wait(),
                                       max(deadline - time.monotonic(), 0.01))
            if self._error is not None:
                raise self._error
            if self.republisher.running:
                return await self.stats()
            if time.monotonic() >= deadline:
                raise MessagingConnectionError(
                    f"republisher for {self.republisher.topic!r} not running after "
                    f"{timeout_s}s (brokers at {self.settings.bootstrap_servers})")
            await asyncio.sleep(0.05)

    async def stats(self) -> dict[str, Any]:
        stats = self.republisher.stats()
        stats.update(restarts=self._restarts, fenced=self._fenced,
                     error=str(self._error) if self._error else None, node_id=_node_id())
        return stats

    async def fingerprint(self) -> str:
        return self._fingerprint

    async def stop(self) -> None:
        """Stop after the current transaction; held messages stay in Kafka, uncommitted."""
        self.republisher.stop()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 30)
        await self.republisher.close()
        await asyncio.to_thread(self.republisher.telemetry.shutdown)

    async def flush_telemetry(self) -> None:
        """Export the spans and metrics this actor holds now (with an exporter set)."""
        await asyncio.to_thread(self.republisher.telemetry.flush)


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
