"""Delay and dead-letter topics: created when missing, refused when they would lose data."""

from __future__ import annotations

from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from athomic.errors import ConfigurationError, MessagingConnectionError
from athomic.settings import MessagingSettings

WEEK_MS = 7 * 24 * 3600 * 1000
_TOPIC_ALREADY_EXISTS = 36


def required_retention_ms(settings: MessagingSettings, bucket_s: float) -> int:
    """The shortest retention a delay topic of ``bucket_s`` may have: a record must outlive
    its stay in the bucket plus the configured margin (time for a stalled republisher to
    come back)."""
    return round((bucket_s + settings.republisher.retention_margin_s) * 1000)


def created_retention_ms(settings: MessagingSettings, bucket_s: float) -> int:
    return max(WEEK_MS, 2 * required_retention_ms(settings, bucket_s))


async def ensure_topics(settings: MessagingSettings, topics: dict[float, str],
                        with_dead_letter: bool = True) -> dict[str, int]:
    """Create missing delay topics (and the dead-letter topic); refuse an existing delay
    topic whose retention is shorter than ``required_retention_ms``. Returns each topic's
    partition count."""
    rep = settings.republisher
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())
    try:
        await admin.start()
    except KafkaError as exc:
        await admin.close()
        raise MessagingConnectionError(f"cannot reach the Kafka brokers: {exc!r}") from None
    try:
        wanted = {topic: bucket for bucket, topic in topics.items()}
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        dlq = rep.dead_letter_topic
        replication = rep.replication_factor or min(
            3, len((await admin.describe_cluster())["brokers"]))
        new = [NewTopic(t, rep.partitions, replication,
                        topic_configs={"retention.ms": str(created_retention_ms(
                            settings, wanted[t]))}) for t in missing]
        if with_dead_letter and dlq not in existing:
            new.append(NewTopic(dlq, 1, replication,
                                topic_configs={"retention.ms": str(4 * WEEK_MS)}))
        if new:
            response = await admin.create_topics(new)
            for entry in response.topic_errors:
                name, code = entry[0], entry[1]
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    message = entry[2] if len(entry) > 2 else ""
                    raise ConfigurationError(
                        f"cannot create topic {name!r}: error {code} {message}")
        await _check_retention(admin, settings, wanted)
        meta = await admin.describe_topics(list(wanted) + ([dlq] if with_dead_letter else []))
        return {t["topic"]: len(t["partitions"]) for t in meta}
    finally:
        await admin.close()


async def _check_retention(admin: Any, settings: MessagingSettings,
                           wanted: dict[str, float]) -> None:
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, t, {"retention.ms": None}) for t in wanted])
    for response in responses:
        for resource in response.resources:
            name = resource[3]
            configs = {c[0]: c[1] for c in resource[4]}
            value = configs.get("retention.ms")
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
