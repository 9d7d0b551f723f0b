"""Delay and dead-letter topics: created when missing, refused when they would lose data;
and the republisher's progress in them, as the brokers see it."""

from __future__ import annotations

import asyncio
from typing import Any

from athomic._kafka import (
    AIOKAFKA,
    KafkaAdmin,
    KafkaClients,
    TopicPartition,
    TopicSpec,
    stop_quietly,
)
from athomic._kafka import connection_error as _connection_error
from athomic.errors import ConfigurationError
from athomic.settings import MessagingSettings

WEEK_MS = 7 * 24 * 3600 * 1000


def required_retention_ms(settings: MessagingSettings, bucket_s: float) -> int:
    """The shortest retention a delay topic of ``bucket_s`` may have: a record must outlive
    its stay in the bucket plus the configured margin (time for a stalled republisher to
    come back)."""
    return round((bucket_s + settings.republisher.retention_margin_s) * 1000)


def created_retention_ms(settings: MessagingSettings, bucket_s: float) -> int:
    return max(WEEK_MS, 2 * required_retention_ms(settings, bucket_s))


async def open_admin(settings: MessagingSettings, clients: KafkaClients = AIOKAFKA
                     ) -> KafkaAdmin:
    """A started admin client; MessagingConnectionError when the brokers cannot be
    reached."""
    admin = clients.admin(**settings.kafka_client_options())
    try:
        await admin.start()
    except Exception as exc:
        await admin.close()
        raise _connection_error(exc, settings.bootstrap_servers) from None
    return admin


async def ensure_topics(settings: MessagingSettings, topics: dict[float, str],
                        with_dead_letter: bool = True, *,
                        clients: KafkaClients = AIOKAFKA) -> dict[str, int]:
    """Create missing delay topics (and the dead-letter, released-ids and ids topics); refuse an
    existing delay topic whose retention is shorter than ``required_retention_ms``.
    Returns each topic's partition count."""
    rep = settings.republisher
    admin = await open_admin(settings, clients)
    try:
        wanted = {topic: bucket for bucket, topic in topics.items()}
        dlq, released, ids = (rep.dead_letter_topic, settings.released_topic,
                              settings.ids_topic)
        names = list(wanted) + ([dlq, released, ids] if with_dead_letter else [])
        existing = await admin.partition_counts(names)
        replication = rep.replication_factor or min(3, await admin.broker_count())
        # Delay topics are stamped with the brokers' clock: what the republisher measures
        # its own clock against.
        new = [TopicSpec(t, rep.topic_partitions, replication,
                         {"retention.ms": str(created_retention_ms(settings, wanted[t])),
                          "message.timestamp.type": "LogAppendTime"})
               for t in wanted if t not in existing]
        if with_dead_letter and dlq not in existing:
            new.append(TopicSpec(dlq, 1, replication, {"retention.ms": str(4 * WEEK_MS)}))
        if with_dead_letter and ids not in existing:
            # Compacted (the latest event per id) and deleted after the horizon: entries
            # expire on their own.
            keep_ms = round((rep.cancel_horizon_s + rep.retention_margin_s) * 1000)
            new.append(TopicSpec(ids, rep.topic_partitions, replication,
                                 {"cleanup.policy": "compact,delete",
                                  "retention.ms": str(keep_ms),
                                  "segment.ms": str(min(keep_ms, 3_600_000)),
                                  "min.cleanable.dirty.ratio": "0.2"}))
        if with_dead_letter and released not in existing:
            keep_ms = round(rep.dedupe_window_s * 1000) + 3_600_000
            new.append(TopicSpec(released, rep.topic_partitions, replication,
                                 {"retention.ms": str(keep_ms), "cleanup.policy": "delete",
                                  "segment.ms": str(min(keep_ms, 600_000)),
                                  "message.timestamp.type": "LogAppendTime"}))
        await admin.create_topics(new)
        await _check_retention(admin, settings, wanted)
        counts = await admin.partition_counts(names)
        for _ in range(20):  # a topic just created may take a moment to be described
            missing = [t for t in names if t not in counts]
            if not missing:
                break
            await asyncio.sleep(0.25)
            counts = await admin.partition_counts(names)
        if missing:
            raise ConfigurationError(f"topics {missing} could not be created")
        return counts
    finally:
        await admin.close()


async def _check_retention(admin: KafkaAdmin, settings: MessagingSettings,
                           wanted: dict[str, float]) -> None:
    for name, value in (await admin.topic_config(wanted, "retention.ms")).items():
        if value is None:
            continue
        retention = int(value)
        need = required_retention_ms(settings, wanted[name])
        if 0 <= retention < need:
            raise ConfigurationError(
                f"delay topic {name!r} keeps records {retention} ms, shorter than its "
                f"bucket ({wanted[name]} s) plus republisher.retention_margin_s "
                f"({settings.republisher.retention_margin_s} s) = {need} ms: delayed "
                "messages could expire before they are due. Raise the topic's "
                "retention.ms or use another topic")


async def progress(settings: MessagingSettings, *, clients: KafkaClients = AIOKAFKA
                   ) -> list[dict[str, Any]]:
    """Per delay-topic partition: end offset, committed offset, lag (a row with partition
    None for a delay topic that does not exist yet)."""
    options = settings.kafka_client_options()
    admin = await open_admin(settings, clients)
    consumer = clients.consumer(**options, isolation_level="read_committed")
    try:
        try:
            await consumer.start()
        except Exception as exc:
            raise _connection_error(exc, settings.bootstrap_servers) from None
        counts = await admin.partition_counts(settings.delay_topics.values())
        rows: list[dict[str, Any]] = []
        for bucket, topic in settings.delay_topics.items():
            tps = [TopicPartition(topic, p) for p in range(counts.get(topic, 0))]
            if not tps:
                rows.append({"bucket_s": bucket, "topic": topic, "partition": None,
                             "end": 0, "committed": 0, "lag": 0})
                continue
            ends = await consumer.end_offsets(tps)
            committed = await admin.committed(settings.republisher_group, tps)
            for tp in tps:
                offset = committed.get(tp, (0, ""))[0]
                rows.append({"bucket_s": bucket, "topic": topic, "partition": tp.partition,
                             "end": ends[tp], "committed": offset,
                             "lag": max(ends[tp] - offset, 0)})
        return rows
    finally:
        await stop_quietly(consumer, 10.0)
        await admin.close()
