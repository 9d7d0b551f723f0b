"""Replaying the dead-letter topic back into delivery (``athomic dlq replay``).

Each dead letter holding a delay envelope goes back where it belongs: to its final topic
when it is due, or into the delay bucket its remaining time calls for. Replay is exactly
once for read_committed consumers: one transaction per batch carries the records and the
replay's progress (consumer group ``athomic.dlq-replay.<connection>``), under a
transactional id per connection, so a second replay (or one interrupted and run again)
never sends a record twice. Records that are not envelopes (they were undecodable when
they were dead-lettered) are counted and left in place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from athomic import envelope
from athomic._kafka import AIOKAFKA, KafkaClients, OffsetAndMetadata, TopicPartition, stop_quietly
from athomic.errors import MalformedEnvelopeError
from athomic.messages import H_ERROR, H_ERROR_SOURCE
from athomic.settings import MessagingSettings
from athomic.strategies import delay_headers, delivered_record, envelope_keys, partition_key

from .schedule import first_hop
from .topics import open_admin

H_REPLAYED_FROM = "athomic-replayed-from"


@dataclass
class ReplayReport:
    """What a replay did."""

    delivered: int = 0
    """Sent to their final topics (they were due)."""
    delayed: int = 0
    """Sent back into a delay topic (not due yet)."""
    left: list[str] = field(default_factory=list)
    """``<partition>/<offset>: why`` of the records left in the dead-letter topic."""
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"delivered": self.delivered, "delayed": self.delayed, "left": self.left,
                "dry_run": self.dry_run}


async def replay(settings: MessagingSettings, *, limit: int | None = None,
                 dry_run: bool = False, clients: KafkaClients = AIOKAFKA,
                 timeout_s: float = 30.0) -> ReplayReport:
    """Replay the dead letters not replayed before (up to ``limit``)."""
    report = ReplayReport(dry_run=dry_run)
    dlq = settings.republisher.dead_letter_topic
    group = f"athomic.dlq-replay.{settings.connection_name}"
    options = settings.kafka_client_options()
    admin = await open_admin(settings, clients)
    try:
        count = (await admin.partition_counts([dlq])).get(dlq, 0)
        tps = [TopicPartition(dlq, p) for p in range(count)]
        committed = await admin.committed(group, tps)
    finally:
        await admin.close()
    if not tps:
        return report
    consumer = clients.consumer(**options, group_id=None, enable_auto_commit=False,
                                isolation_level="read_committed",
                                auto_offset_reset="earliest")
    producer = None if dry_run else clients.producer(
        **options, transactional_id=f"athomic.dlq-replay.{settings.connection_name}",
        enable_idempotence=True, acks="all")
    try:  # a start that fails may have opened connections: the stop below closes them
        await consumer.start()
        if producer is not None:
            await producer.start()
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, committed.get(tp, (0, ""))[0])
        keys = envelope_keys(settings)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                break
            if limit is not None and report.delivered + report.delayed >= limit:
                break
            batch = await consumer.getmany(*tps, timeout_ms=500, max_records=500)
            if not batch:
                continue
            outgoing: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
            progress: dict[TopicPartition, OffsetAndMetadata] = {}
            for tp, records in batch.items():
                for record in records:
                    if limit is not None and \
                            report.delivered + report.delayed + len(outgoing) >= limit:
                        break
                    progress[tp] = OffsetAndMetadata(record.offset + 1, "")
                    item = _back(settings, keys, record, tp, report)
                    if item is not None:
                        outgoing.append(item)
            if producer is not None and progress:
                await producer.begin_transaction()
                futures = [await producer.send(topic, value, key=key, headers=headers)
                           for topic, key, value, headers in outgoing]
                for future in futures:
                    await future
                await producer.send_offsets_to_transaction(progress, group)
                await producer.commit_transaction()
    finally:
        await stop_quietly(consumer, 10.0)
        if producer is not None:
            await producer.stop()
    return report


def _back(settings: MessagingSettings, keys: envelope.EnvelopeKeys | None, record: Any,
          tp: TopicPartition, report: ReplayReport
          ) -> tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]] | None:
    """Where a dead letter goes back to (None: it stays, counted in ``report.left``)."""
    where = f"{tp.partition}/{record.offset}"
    if record.value is None:
        report.left.append(f"{where}: no value (too large for the dead-letter topic; see "
                           f"{dict(record.headers or ()).get(H_ERROR_SOURCE, b'?').decode()})")
        return None
    try:
        env = envelope.decode(record.value, keys,
                              accept_unauthenticated=settings.republisher.accept_unauthenticated)
    except MalformedEnvelopeError as exc:
        report.left.append(f"{where}: not a delay envelope ({exc})")
        return None
    source = [(H_REPLAYED_FROM, f"{tp.topic}/{where}".encode())]
    now = int(time.time() * 1000)
    buckets = sorted(settings.delay_topics)
    if env.deliver_at_ms <= now or not buckets:
        final = delivered_record(env)
        report.delivered += 1
        headers = [h for h in final.headers if h[0] not in (H_ERROR, H_ERROR_SOURCE)]
        return final.topic, final.key, final.value, headers + source
    bucket, hold = first_hop(buckets, now, env.deliver_at_ms)
    again = env.next_hop(hold)
    report.delayed += 1
    return (settings.delay_topics[bucket], partition_key(again),
            envelope.encode(again, keys), delay_headers(again) + source)
