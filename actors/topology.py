"""Where the plain actor classes become Ray actors: names, namespace, restarts, resources,
and how a cluster is reconciled to the settings (``athomic up / down / status``).

Every actor athomic starts is a named, detached actor in the ``athomic`` namespace whose
name begins with the connection name, so any process in the cluster that asks for the same
connection gets the same actors, and ``teardown`` finds them all again.

Reconciling is split in two: ``make_plan`` is a pure function of the settings, the running
actors (name and settings fingerprint) and the topics on the brokers; ``apply`` carries a
plan out. DelayBucketActors live in one of two *slots* (``a``, ``b``): a new republisher
layout starts in the free slot with a newer generation, takes every partition over (a
partition's new holder fences the old one, docs/delays.md "Ownership"), and only then is
the old slot stopped, so delivery never pauses and no partition is ever delivered twice.
ProducerActors and StageActors keep one name each: a replaced one flushes, then goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from athomic._exporters import otel_environment
from athomic._kafka import AIOKAFKA, KafkaClients, TopicPartition, stop_quietly
from athomic.errors import AthomicError, ConfigurationError, MessagingConnectionError
from athomic.republisher.schedule import Owner, decode_commit
from athomic.republisher.topics import (
    created_retention_ms,
    ensure_topics,
    open_admin,
    required_retention_ms,
)
from athomic.settings import MessagingSettings

from .delay_bucket import DelayBucketActor
from .producer import ProducerActor
from .stage import StageActor

NAMESPACE = "athomic"
STAGE_START_TIMEOUT_S = 120.0
_STOP_S = 5.0
"""At most this long to stop a client of a status or plan query (a consumer's stop can hang
on a fetch the brokers do not answer)."""
"""How long ``apply_producers`` waits for the StageActor pool to be scheduled."""


# --- names ---------------------------------------------------------------------------------
# <connection>.producer.<lane>.<i>, <connection>.stage.<i>,
# <connection>.delay.<slot>.<delay topic>.<replica>. Only this module builds or reads them.
PRODUCER, STAGE, DELAY = "producer", "stage", "delay"
SLOTS = ("a", "b")
LANES = ("high", "normal", "low")


def producer_actor_name(connection_name: str, lane: str, index: int) -> str:
    return f"{connection_name}.{PRODUCER}.{lane}.{index}"


def stage_actor_name(connection_name: str, index: int) -> str:
    return f"{connection_name}.{STAGE}.{index}"


def delay_actor_name(connection_name: str, topic: str, replica: int, slot: str = SLOTS[0]
                     ) -> str:
    return f"{connection_name}.{DELAY}.{slot}.{topic}.{replica}"


@dataclass(frozen=True)
class ActorName:
    """What an athomic actor's name says about it."""

    kind: str
    lane: str | None = None
    index: int | None = None
    topic: str | None = None
    replica: int | None = None
    slot: str | None = None

    @property
    def role(self) -> str:
        """``high 0``, ``0`` (a stage actor), ``<delay topic> replica 1``."""
        if self.kind == PRODUCER:
            return f"{self.lane} {self.index}"
        if self.kind == STAGE:
            return str(self.index)
        return f"{self.topic} replica {self.replica}"

    @property
    def key(self) -> tuple[Any, ...]:
        """The same for an actor and its replacement in the other slot."""
        return (self.kind, self.lane, self.index, self.topic, self.replica)

    def name(self, connection_name: str) -> str:
        if self.kind == PRODUCER:
            assert self.lane is not None and self.index is not None
            return producer_actor_name(connection_name, self.lane, self.index)
        if self.kind == STAGE:
            assert self.index is not None
            return stage_actor_name(connection_name, self.index)
        assert self.topic is not None and self.replica is not None
        return delay_actor_name(connection_name, self.topic, self.replica,
                                self.slot or SLOTS[0])


def parse_actor_name(connection_name: str, name: str) -> ActorName | None:
    """The parts of a name this module built for the connection; None for any other name."""
    prefix = f"{connection_name}."
    if not name.startswith(prefix):
        return None
    kind, _, tail = name[len(prefix):].partition(".")
    if kind == PRODUCER:
        lane, _, index = tail.rpartition(".")
        if lane in LANES and index.isdigit():
            return ActorName(PRODUCER, lane=lane, index=int(index))
    elif kind == STAGE:
        if tail.isdigit():
            return ActorName(STAGE, index=int(tail))
    elif kind == DELAY:
        slot, _, rest = tail.partition(".")
        topic, _, replica = rest.rpartition(".")
        if slot in SLOTS and topic and replica.isdigit():
            return ActorName(DELAY, topic=topic, replica=int(replica), slot=slot)
    return None


def actor_kind(connection_name: str, name: str) -> str | None:
    """``producer``, ``stage`` or ``delay`` for a name this module built for the
    connection; None for any other name."""
    parsed = parse_actor_name(connection_name, name)
    return parsed.kind if parsed else None


def _lane_sizes(settings: MessagingSettings) -> dict[str, int]:
    lanes = settings.lanes
    sizes = {"high": lanes.high, "normal": lanes.normal}
    if lanes.low:
        sizes["low"] = lanes.low
    return sizes


def _stage_replicas(settings: MessagingSettings) -> int:
    specs = [s for s in settings.pipeline
             if s.stage != "serialize" and s.placement == "actors"]
    return specs[0].replicas if specs else 0


def desired_actors(settings: MessagingSettings) -> list[ActorName]:
    """Every actor the settings call for (DelayBucketActors without a slot), in the order
    they are shown: producers by lane, stage actors, delay buckets by topic and replica."""
    wanted = [ActorName(PRODUCER, lane=lane, index=i)
              for lane, count in _lane_sizes(settings).items() for i in range(count)]
    wanted += [ActorName(STAGE, index=i) for i in range(_stage_replicas(settings))]
    if settings.republisher.enabled:
        wanted += [ActorName(DELAY, topic=topic, replica=r)
                   for topic in settings.delay_topics.values()
                   for r in range(settings.republisher.replicas)]
    return wanted


# --- the plan: pure ------------------------------------------------------------------------
CREATE, REPLACE, REMOVE, UNCHANGED = "create", "replace", "remove", "unchanged"
SYMBOLS = {CREATE: "+", REPLACE: "~", REMOVE: "-", UNCHANGED: "="}
_KIND_ORDER = {PRODUCER: 0, STAGE: 1, DELAY: 2}


@dataclass(frozen=True)
class RunningActor:
    """A running athomic actor as the plan sees it: its name and the fingerprint of the
    settings it runs with (None: it did not answer)."""

    name: str
    fingerprint: str | None


@dataclass(frozen=True)
class ActorChange:
    """One line of a plan: what happens to one actor."""

    action: str
    kind: str
    role: str
    name: str
    """The actor created, kept or removed."""
    old: str | None = None
    """For a replacement under another name (a DelayBucketActor in the other slot): the
    actor it takes over from, removed once the new one is ready."""
    why: str = ""
    topic: str | None = None
    """A DelayBucketActor's delay topic."""


@dataclass(frozen=True)
class TopicState:
    """A topic as the brokers describe it (retention None: not reported)."""

    partitions: int
    retention_ms: int | None = None


@dataclass(frozen=True)
class TopicChange:
    action: str
    topic: str
    role: str
    detail: str


@dataclass(frozen=True)
class Plan:
    """What ``apply`` does to bring a connection's actors and topics to the settings."""

    connection: str
    fingerprint: str
    actors: tuple[ActorChange, ...]
    topics: tuple[TopicChange, ...] = ()
    slot: str = SLOTS[0]
    """Where new DelayBucketActors start."""
    retire_first: tuple[str, ...] = ()
    """DelayBucketActors stopped before new ones start (both slots were taken)."""
    stranded: tuple[tuple[str, int], ...] = ()
    """Delay topics no longer configured, with the messages still waiting in them (filled
    in from the brokers by ``read_plan``)."""

    @property
    def removed_topics(self) -> list[str]:
        """Delay topics whose republishers the plan removes and the settings no longer
        name."""
        return sorted({c.topic for c in self.actors if c.topic is not None
                       and c.action == REMOVE and c.why == _GONE_TOPIC})

    def count(self, action: str) -> int:
        return (sum(1 for c in self.actors if c.action == action)
                + sum(1 for t in self.topics if t.action == action))

    @property
    def changes(self) -> int:
        """How many actors and topics the plan changes (0: the cluster matches)."""
        return sum(self.count(a) for a in (CREATE, REPLACE, REMOVE))

    def render(self) -> list[str]:
        """The plan as lines: ``+ create``, ``~ replace``, ``- remove``, ``= unchanged``."""
        lines = []
        if self.topics:
            lines.append("topics")
            lines += [f"  {SYMBOLS[t.action]} {t.action:<9}  {t.role:<12} {t.topic:<36} "
                      f"{t.detail}".rstrip() for t in self.topics]
        lines.append("actors")
        lines += [f"  {SYMBOLS[c.action]} {c.action:<9}  {c.kind:<12} {c.role:<36} "
                  f"{c.why}".rstrip() for c in self.actors]
        lines += [f"  ! {topic} is no longer configured and still holds {n} undelivered "
                  "message(s)" for topic, n in self.stranded]
        lines.append(f"Plan: {self.count(CREATE)} to create, {self.count(REPLACE)} to "
                     f"replace, {self.count(REMOVE)} to remove, {self.count(UNCHANGED)} "
                     "unchanged.")
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {"connection": self.connection, "fingerprint": self.fingerprint,
                "changes": self.changes, "slot": self.slot,
                "topics": [vars(t) for t in self.topics],
                "actors": [vars(c) for c in self.actors],
                "stranded": dict(self.stranded)}


_GONE_TOPIC = "bucket no longer configured"


def make_plan(settings: MessagingSettings, running: Iterable[RunningActor],
              topics: Mapping[str, TopicState] | None = None) -> Plan:
    """The changes that bring the running actors (and, given ``topics``, the topics on the
    brokers) to ``settings``. Pure: no Ray, no Kafka.

    ProducerActors and StageActors are replaced in place (same name) when their settings
    differ or they do not answer. DelayBucketActors are kept when one slot already runs the
    whole layout with these settings (missing ones are added to it); otherwise the new
    layout goes to the free slot and the old slot's actors are removed once it runs.
    Raises ConfigurationError for a delay topic whose retention could lose messages.
    """
    conn, fp = settings.connection_name, settings.fingerprint()
    parsed: list[tuple[ActorName, RunningActor]] = []
    for actor in running:
        parts = parse_actor_name(conn, actor.name)
        if parts is not None:
            parsed.append((parts, actor))
    desired = desired_actors(settings)
    changes: list[ActorChange] = []

    # ProducerActors and StageActors: one name each.
    fixed = {a.name: (n, a) for n, a in parsed if n.kind != DELAY}
    stages_change = False
    for want in (w for w in desired if w.kind == STAGE):
        name = want.name(conn)
        found = fixed.pop(name, None)
        change = (ActorChange(CREATE, STAGE, want.role, name) if found is None
                  else _keep_or_replace(want, found[1], fp, name))
        stages_change |= change.action != UNCHANGED
        changes.append(change)
    stale = [ActorChange(REMOVE, n.kind, n.role, a.name, why="not in the settings")
             for n, a in fixed.values() if n.kind == STAGE]
    stages_change |= bool(stale)
    for want in (w for w in desired if w.kind == PRODUCER):
        name = want.name(conn)
        found = fixed.pop(name, None)
        if found is None:
            changes.append(ActorChange(CREATE, PRODUCER, want.role, name))
        elif stages_change and found[1].fingerprint == fp:
            # a producer holds its StageActors' handles from its start
            changes.append(ActorChange(REPLACE, PRODUCER, want.role, name,
                                       why="stage actors replaced"))
        else:
            changes.append(_keep_or_replace(want, found[1], fp, name))
    changes += stale + [ActorChange(REMOVE, n.kind, n.role, a.name, why="not in the settings")
                        for n, a in fixed.values() if n.kind != STAGE]

    delay_changes, slot, retire = _plan_delay(
        conn, fp, [w for w in desired if w.kind == DELAY],
        [(n, a) for n, a in parsed if n.kind == DELAY],
        set(settings.delay_topics.values()))
    changes += delay_changes
    # shown (and applied) in the settings' order, removals after
    order = {(w.kind, w.role): i for i, w in enumerate(desired)}
    changes.sort(key=lambda c: (_KIND_ORDER[c.kind], c.action == REMOVE,
                                order.get((c.kind, c.role), len(order)), c.role))
    return Plan(conn, fp, tuple(changes),
                _plan_topics(settings, topics) if topics is not None else (),
                slot, tuple(retire))


def _keep_or_replace(want: ActorName, actor: RunningActor, fp: str, name: str
                     ) -> ActorChange:
    if actor.fingerprint == fp:
        return ActorChange(UNCHANGED, want.kind, want.role, name, topic=want.topic)
    return _replace(want, actor, fp, name)


def _replace(want: ActorName, actor: RunningActor, fp: str, name: str,
             old: str | None = None) -> ActorChange:
    why = ("not responding" if actor.fingerprint is None else
           "settings changed" if actor.fingerprint != fp else "new layout")
    return ActorChange(REPLACE, want.kind, want.role, name, old=old, why=why,
                       topic=want.topic)


def _plan_delay(conn: str, fp: str, desired: list[ActorName],
                running: list[tuple[ActorName, RunningActor]], configured: set[str]
                ) -> tuple[list[ActorChange], str, list[str]]:
    by_slot: dict[str, dict[tuple[Any, ...], tuple[ActorName, RunningActor]]] = {
        s: {} for s in SLOTS}
    for parts, actor in running:
        assert parts.slot is not None
        by_slot[parts.slot][parts.key] = (parts, actor)
    wanted = {w.key: w for w in desired}

    def _remove(parts: ActorName, actor: RunningActor) -> ActorChange:
        why = _GONE_TOPIC if parts.topic not in configured else "not in the settings"
        return ActorChange(REMOVE, DELAY, parts.role, actor.name, why=why,
                           topic=parts.topic)

    def fits(slot: str) -> bool:
        """The slot runs (part of) this layout with these settings and nothing else that
        is wanted."""
        mine = [a for k, (_, a) in by_slot[slot].items() if k in wanted]
        return bool(mine) and all(a.fingerprint == fp for a in mine)

    current = [s for s in SLOTS if fits(s)]
    if desired and current:
        # the layout runs (perhaps partly) in one slot: keep it, complete it
        slot = max(current, key=lambda s: sum(k in wanted for k in by_slot[s]))
        changes = []
        for key, want in wanted.items():
            name = ActorName(DELAY, topic=want.topic, replica=want.replica,
                             slot=slot).name(conn)
            if key in by_slot[slot]:
                changes.append(ActorChange(UNCHANGED, DELAY, want.role, name,
                                           topic=want.topic))
            else:
                changes.append(ActorChange(CREATE, DELAY, want.role, name, why="missing",
                                           topic=want.topic))
        for s in SLOTS:
            changes += [_remove(n, a) for k, (n, a) in by_slot[s].items()
                        if s != slot or k not in wanted]
        return changes, slot, []
    if not desired:
        return ([_remove(n, a) for s in SLOTS for n, a in by_slot[s].values()],
                SLOTS[0], [])
    # A new layout: into a free slot (or the emptier one, stopped first).
    free = [s for s in SLOTS if not by_slot[s]]
    slot = free[0] if free else min(SLOTS[::-1], key=lambda s: len(by_slot[s]))
    retire = [a.name for _, a in by_slot[slot].values()] if not free else []
    changes = []
    taken_over: set[str] = set()
    for key, want in wanted.items():
        name = ActorName(DELAY, topic=want.topic, replica=want.replica, slot=slot).name(conn)
        before = [by_slot[s][key] for s in SLOTS if key in by_slot[s]]
        if before:
            # the one in the other slot if any (it runs until the new one is ready)
            _, old = min(before, key=lambda na: na[0].slot == slot)
            taken_over.add(old.name)
            changes.append(_replace(want, old, fp, name,
                                    old=None if old.name == name else old.name))
        else:
            changes.append(ActorChange(CREATE, DELAY, want.role, name, topic=want.topic))
    for s in SLOTS:
        changes += [_remove(n, a) for n, a in by_slot[s].values()
                    if a.name not in taken_over]
    return changes, slot, retire


def _days(ms: int) -> str:
    return f"{ms / 86_400_000:g}d" if ms >= 86_400_000 else f"{ms / 1000:g}s"


def _plan_topics(settings: MessagingSettings, topics: Mapping[str, TopicState]
                 ) -> tuple[TopicChange, ...]:
    """Topics athomic creates or checks: the delay topics, and with them the dead-letter
    topic and athomic's other own topics."""
    if not settings.delay_topics:
        return ()
    rep = settings.republisher
    buckets = {topic: bucket for bucket, topic in settings.delay_topics.items()}
    own = sorted(settings.reserved_topics() - set(buckets))
    changes = []
    for topic in [*buckets, *own]:
        bucket = buckets.get(topic)
        role = (f"delay {bucket:g}s" if bucket is not None else
                "dead letters" if topic == rep.dead_letter_topic else "athomic")
        state = topics.get(topic)
        if state is None:
            detail = (f"{_partitions(rep.topic_partitions)}, keeps "
                      f"{_days(created_retention_ms(settings, bucket))}"
                      if bucket is not None else "")
            changes.append(TopicChange(CREATE, topic, role, detail))
            continue
        keeps = state.retention_ms
        if bucket is not None and keeps is not None and 0 <= keeps < (
                need := required_retention_ms(settings, bucket)):
            raise ConfigurationError(
                f"delay topic {topic!r} keeps records {keeps} ms, shorter than its bucket "
                f"({bucket:g} s) plus republisher.retention_margin_s "
                f"({rep.retention_margin_s:g} s) = {need} ms: delayed messages could expire "
                "before they are due; raise the topic's retention.ms or use another topic")
        kept = ("" if keeps is None else ", keeps forever" if keeps < 0
                else f", keeps {_days(keeps)}")
        idle = rep.replicas - state.partitions
        if bucket is not None and idle > 0:  # picked up once partitions are added
            kept += (f"; {idle} of {rep.replicas} replicas own no partition "
                     "(add partitions to use them)")
        changes.append(TopicChange(UNCHANGED, topic, role,
                                   f"{_partitions(state.partitions)}{kept}"))
    return tuple(changes)


def _partitions(count: int) -> str:
    return f"{count} partition{'' if count == 1 else 's'}"


def missing_resources(demands: Sequence[float], nodes: Sequence[float]) -> str | None:
    """Why actors needing ``demands`` CPUs each can never all run on nodes with ``nodes``
    CPUs in all (None: they can)."""
    needed = [d for d in demands if d > 0]
    if not needed:
        return None
    largest, total = max(nodes, default=0.0), sum(nodes)
    if max(needed) > largest:
        return (f"an actor needs {max(needed):g} CPU and the largest node has "
                f"{largest:g}")
    if sum(needed) > total + 1e-9:
        return f"the actors need {sum(needed):g} CPUs and the cluster has {total:g}"
    return None


# --- health: pure --------------------------------------------------------------------------
def partition_rows(settings: MessagingSettings, brokers: Sequence[Mapping[str, Any]],
                   actors: Sequence[Mapping[str, Any]], now_ms: int) -> list[dict[str, Any]]:
    """Per delay-topic partition (``brokers``: topic, partition, end, committed, lag,
    holder) joined with the DelayBucketActor that owns it (``actors``: reports with
    ``stats``): owner, its node and state, held messages, lateness p99, clock skew."""
    rows = []
    lease_ms = 3 * settings.republisher.partition_refresh_s * 1000
    for row in brokers:
        out = dict(row)
        out.update(owner=None, owner_node=None, state=None, note="", held=0,
                   lateness_p99_ms=None, clock_skew_ms=None)
        holders = []
        for actor in actors:
            stats = actor.get("stats") or {}
            if stats.get("topic") != row["topic"] or row["partition"] is None:
                continue
            part = (stats.get("partition_states") or {}).get(row["partition"])
            if part is not None:
                holders.append((part, actor, stats))
        owned = [h for h in holders if h[0]["state"] == "owned"]
        if owned:
            part, actor, stats = max(owned, key=lambda h: h[2].get("generation", 0))
            out.update(owner=actor["name"], owner_node=actor.get("node"), state="owned",
                       held=part.get("held", 0),
                       lateness_p99_ms=round(stats["lateness"]["p99_s"] * 1000, 1),
                       clock_skew_ms=stats.get("clock_skew_ms"))
        elif holders:
            part = holders[0][0]
            out.update(state=part["state"], note=part.get("note", ""))
        elif row.get("holder") and now_ms - row.get("lease_ms", 0) < lease_ms:
            # held by a process outside Ray (``athomic republisher run``)
            out.update(owner=f"process {row['holder']}", state="owned")
        rows.append(out)
    return rows


def assess(settings: MessagingSettings, plan: Plan, actors: Sequence[Mapping[str, Any]],
           partitions: Sequence[Mapping[str, Any]], brokers_error: str | None = None
           ) -> list[str]:
    """What is wrong (empty: healthy): actors missing, dead, not responding or running
    other settings; delay-topic partitions without an owner or refused; a clock further off
    the brokers' than ``republisher.max_clock_skew_ms``; brokers unreachable."""
    problems = []
    if brokers_error:
        problems.append(f"brokers unreachable: {brokers_error}")
    for change in plan.actors:
        if change.action == CREATE:
            problems.append(f"{change.kind} {change.role}: missing")
        elif change.action == REPLACE:
            problems.append(f"{change.kind} {change.role}: {change.why} (run athomic up)")
    wanted = {c.name for c in plan.actors if c.action != REMOVE}
    for actor in actors:
        if actor["name"] not in wanted:
            continue
        if actor.get("state") not in (None, "ALIVE"):
            problems.append(f"{actor['kind']} {actor['role']}: {actor['state']}")
        elif not actor.get("responding", True):
            problems.append(f"{actor['kind']} {actor['role']}: not responding")
    limit = settings.republisher.max_clock_skew_ms
    for actor in actors:
        skew = (actor.get("stats") or {}).get("clock_skew_ms")
        if actor["name"] in wanted and skew is not None and abs(skew) > limit:
            problems.append(f"{actor['kind']} {actor['role']}: clock {skew:+.0f} ms off the "
                            f"brokers' (republisher.max_clock_skew_ms={limit})")
    for row in partitions:
        where = f"{row['topic']} partition {row['partition']}"
        if row["partition"] is None:
            problems.append(f"{row['topic']}: topic does not exist (run athomic up)")
        elif row.get("state") == "refused":
            problems.append(f"{where}: refused, {row.get('note')}")
        elif row.get("owner") is None:
            note = f" ({row['note']})" if row.get("note") else ""
            problems.append(f"{where}: no owner{note}")
    return problems


# --- Ray -----------------------------------------------------------------------------------
def _named(name: str) -> dict[str, Any]:
    """Options every athomic actor has: found again by name from any process, outliving
    the driver that created it, restarted by Ray without limit."""
    options: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "lifetime": "detached",
                               "get_if_exists": True, "max_restarts": -1}
    env = otel_environment()
    if env:  # an actor's OpenTelemetry SDK reads OTEL_* from its own environment
        options["runtime_env"] = {"env_vars": env}
    return options


def ensure_ray() -> None:
    """Start a local Ray when this process has none (athomic's actors name their own
    namespace, so the caller's driver keeps the default one)."""
    if not ray.is_initialized():
        ray.init(log_to_driver=False)


def _unwrap(exc: BaseException) -> BaseException:
    """An actor's own athomic error out of Ray's wrapper."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, AthomicError):
        return cause
    return exc


def _mismatch(settings: MessagingSettings) -> ConfigurationError:
    conn = settings.connection_name
    return ConfigurationError(
        f"actors of connection {conn!r} run with other settings than these (settings "
        f"fingerprint {settings.fingerprint()}): run `athomic up --config <file>` to "
        "reconcile them to the file, or stop them first (`athomic down`, "
        f"ProducerFactory.shutdown({conn!r})), or use another connection_name")


def apply_producers(settings: MessagingSettings) -> dict[str, list[Any]]:
    """Get or create the ProducerActors of ``settings.connection_name``, by lane.

    Raises ConfigurationError when actors of that connection already run with different
    settings (``athomic up`` replaces them; ``ProducerFactory.shutdown`` stops them).
    """
    ensure_ray()
    running = set(actor_names(settings.connection_name))
    stage_actors = apply_stage_actors(settings)
    if stage_actors:
        try:
            ray.get([a.fingerprint.remote() for a in stage_actors],
                    timeout=STAGE_START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            # Never scheduled, so never started: remove them rather than leave pending
            # actors that hold a name (and make teardown wait for them).
            for actor in stage_actors:
                ray.kill(actor, no_restart=True)
            raise ConfigurationError(
                f"the {len(stage_actors)} StageActors of connection "
                f"{settings.connection_name!r} did not start within "
                f"{STAGE_START_TIMEOUT_S:.0f}s; each reserves 1 CPU: lower the stages' "
                "replicas or add CPUs to the cluster") from None
    lanes = _producer_actors(settings, stage_actors)
    try:
        _check_fingerprints(settings, [a for group in lanes.values() for a in group]
                            + stage_actors)
    except ConfigurationError:
        # Refused: the actors this call started (a lane or a stage replica the running
        # ones lack) go again, so a refused create leaves the connection as it found it.
        named = [(producer_actor_name(settings.connection_name, lane, i), actor)
                 for lane, group in lanes.items() for i, actor in enumerate(group)]
        named += [(stage_actor_name(settings.connection_name, i), actor)
                  for i, actor in enumerate(stage_actors)]
        for name, actor in named:
            if name not in running:
                ray.kill(actor, no_restart=True)
        raise
    return lanes


def _producer_actors(settings: MessagingSettings, stage_actors: list[Any]
                     ) -> dict[str, list[Any]]:
    remote_cls = ray.remote(ProducerActor)
    lanes: dict[str, list[Any]] = {}
    for lane, count in _lane_sizes(settings).items():
        # A call caught by an actor or node failure is retried on the restarted actor,
        # with the same message id: at-least-once, deduplicable.
        lanes[lane] = [
            remote_cls.options(**_named(producer_actor_name(settings.connection_name, lane, i)),
                               max_task_retries=-1, num_cpus=settings.lanes.actor_num_cpus,
                               max_concurrency=10_000).remote(
                settings, lane, i, stage_actors,
                nice=0 if lane == "high" else settings.lanes.nice, own_process=True)
            for i in range(count)
        ]
    return lanes


def _check_fingerprints(settings: MessagingSettings, actors: list[Any]) -> None:
    expected = settings.fingerprint()
    found = ray.get([a.fingerprint.remote() for a in actors])
    if any(fp != expected for fp in found):
        raise _mismatch(settings)


def _group_prefix(connection_name: str, slot: str | None = None) -> str:
    return f"athomic:{connection_name}:" + (f"{slot}:" if slot else "")


def spread(settings: MessagingSettings, count: int, *, slot: str = SLOTS[0],
           timeout_s: float = 120.0) -> list[Any]:
    """Scheduling strategies for ``count`` DelayBucketActors: the bundles of one SPREAD
    placement group, so consecutive replicas sit on different nodes whenever there are
    several, and Ray re-places a lost node's bundle (and restarts its actor) on another
    node. One node: default scheduling, no group.

    A bundle holds what a DelayBucketActor asks for (``republisher.actor_num_cpus``);
    with the default of 0 CPU it holds one byte of the ``memory`` resource instead (a
    bundle cannot be empty). A bundle of 0.001 CPU, as before, left every node it sat on
    with a fraction of a CPU short of a whole one: a task asking for all of a node's CPUs
    (e.g. ``num_cpus=1`` on a 1-CPU node) could never run there while athomic was up."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    alive = [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
    if len(alive) < 2 or count == 0:
        return ["DEFAULT"] * count
    cpus = settings.republisher.actor_num_cpus
    bundle = {"CPU": cpus} if cpus > 0 else {"memory": 1}
    name = (f"{_group_prefix(settings.connection_name, slot)}"
            f"{settings.fingerprint()}:{count}")
    group = _placement_group(name)
    if group is None:
        group = placement_group([bundle] * count, strategy="SPREAD", name=name,
                                lifetime="detached")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(group)
        raise ConfigurationError(
            f"the {count} DelayBucketActors of connection {settings.connection_name!r} "
            f"could not be placed within {timeout_s:.0f}s: each needs {bundle} on some "
            "node (republisher.actor_num_cpus)")
    return [PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
            for i in range(count)]


def _placement_groups(prefix: str) -> list[tuple[str, Any]]:
    """(name, handle) of the live placement groups whose name starts with ``prefix``."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    found = []
    for pg_id, info in ray.util.placement_group_table().items():
        name = info.get("name") or ""
        if name.startswith(prefix) and info.get("state") != "REMOVED":
            found.append((name, PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id)))))
    return found


def _placement_group(name: str) -> Any | None:
    for found, group in _placement_groups(name):
        if found == name:
            return group
    return None


def _start_delay_actors(settings: MessagingSettings, slot: str, only: set[str] | None,
                        generation: int, timeout_s: float) -> dict[str, Any]:
    """Get or create the DelayBucketActors of the settings' layout in ``slot`` (only the
    names in ``only``, when given); name -> handle."""
    remote_cls = ray.remote(DelayBucketActor)
    replicas = settings.republisher.replicas
    conn = settings.connection_name
    slots = [(topic, i) for topic in settings.delay_topics.values() for i in range(replicas)]
    strategies = spread(settings, len(slots), slot=slot, timeout_s=timeout_s)
    actors = {}
    for (topic, i), strategy in zip(slots, strategies, strict=True):
        name = delay_actor_name(conn, topic, i, slot)
        if only is not None and name not in only:
            continue
        # ready/stats/stop are idempotent: safe to retry on a restarted actor.
        actors[name] = remote_cls.options(
            **_named(name), max_task_retries=-1,
            num_cpus=settings.republisher.actor_num_cpus,
            scheduling_strategy=strategy).remote(settings, topic, i, replicas,
                                                 generation=generation, own_process=True)
    return actors


def apply_republisher(settings: MessagingSettings, *, timeout_s: float = 120.0
                      ) -> list[Any]:
    """Get or create the DelayBucketActors of a connection: ``republisher.replicas`` per
    delay topic, spread over the nodes (``spread``), restarted by Ray without limit.
    Returns once each runs (its topics created or checked); raises the first start error
    as soon as it is known (MessagingConnectionError: brokers unreachable;
    ConfigurationError: a topic that would lose messages, or actors running other
    settings, which ``athomic up`` reconciles)."""
    ensure_ray()
    running = describe(settings.connection_name, kind=DELAY, timeout_s=timeout_s)
    plan = make_plan(settings, running)
    mine = [c for c in plan.actors if c.kind == DELAY and c.action != REMOVE]
    if plan.retire_first or any(c.action == REPLACE for c in mine):
        raise _mismatch(settings)
    # A newer layout wins a partition over an older one still running (ownership, see
    # republisher.loop); actors that already run keep their generation.
    generation = time.time_ns() // 1_000_000
    actors = list(_start_delay_actors(settings, plan.slot, None, generation,
                                      timeout_s).values())
    _check_fingerprints(settings, actors)
    _all_ready([a.ready.remote(timeout_s) for a in actors])
    return actors


def _all_ready(refs: list[Any]) -> None:
    """Wait for every readiness call; raise the first failure (the actor's own error) as
    soon as it is known, after giving the others a moment to fail too, so that no failed
    call is left unread (Ray logs those as unhandled errors)."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except ray.exceptions.RayError as exc:
            late, _ = ray.wait(pending, num_returns=len(pending), timeout=2.0)
            for ref in late:
                with contextlib.suppress(ray.exceptions.RayError):
                    ray.get(ref)
            raise _unwrap(exc) from None


def apply_stage_actors(settings: MessagingSettings) -> list[Any]:
    """Get or create the StageActor pool of a connection (none unless a pipeline stage is
    placed on actors). Each replica reserves one CPU, so Ray spreads them over the
    cluster's nodes and cores."""
    count = _stage_replicas(settings)
    remote_cls = ray.remote(StageActor)
    # Encoding is a pure function of its input: retrying after a restart is safe.
    return [
        remote_cls.options(**_named(stage_actor_name(settings.connection_name, i)),
                           max_task_retries=3, num_cpus=1).remote(settings, i)
        for i in range(count)
    ]


def actor_names(connection_name: str, kind: str | None = None) -> list[str]:
    """Names of every live athomic actor of a connection (of one ``kind``: ``producer``,
    ``stage``, ``delay``)."""
    if not ray.is_initialized():
        return []
    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] != NAMESPACE:
            continue
        name_kind = actor_kind(connection_name, entry["name"])
        if name_kind is not None and kind in (None, name_kind):
            found.append(entry["name"])
    return sorted(found)


def _handles(names: Iterable[str]) -> dict[str, Any]:
    found = {}
    for name in names:
        with contextlib.suppress(ValueError):  # gone meanwhile
            found[name] = ray.get_actor(name, namespace=NAMESPACE)
    return found


def _answers(calls: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
    """name -> result of the calls that answered within ``timeout_s`` (an exception for a
    call that failed)."""
    refs = {ref: name for name, ref in calls.items()}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    out: dict[str, Any] = {}
    for ref in ready:
        try:
            out[refs[ref]] = ray.get(ref)
        except ray.exceptions.RayError as exc:
            out[refs[ref]] = exc
    return out


def describe(connection_name: str, *, kind: str | None = None, timeout_s: float = 30.0
             ) -> list[RunningActor]:
    """The running actors of a connection with the fingerprint of their settings (None
    for one that did not answer within ``timeout_s``)."""
    handles = _handles(actor_names(connection_name, kind))
    if not handles:
        return []
    found = _answers({n: h.fingerprint.remote() for n, h in handles.items()}, timeout_s)
    return [RunningActor(n, fp if isinstance(fp := found.get(n), str) else None)
            for n in handles]


def _wait_gone(names: Iterable[str], timeout_s: float = 30.0) -> None:
    """Until the killed actors' names are free again (a new actor may take them)."""
    names = set(names)
    deadline = time.monotonic() + timeout_s
    while names and time.monotonic() < deadline:
        live = {e["name"] for e in ray.util.list_named_actors(all_namespaces=True)
                if e["namespace"] == NAMESPACE}
        if not names & live:
            return
        time.sleep(0.1)


def _retire(names: Sequence[str], *, timeout_s: float = 30.0) -> list[str]:
    """Stop (flush) the actors, kill them, wait until their names are free."""
    handles = _handles(names)
    stops = [h.stop.remote() for h in handles.values()]
    if stops:
        ray.wait(stops, num_returns=len(stops), timeout=timeout_s)
    for h in handles.values():
        ray.kill(h, no_restart=True)
    _wait_gone(handles)
    return list(handles)


def _remove_groups(connection_name: str, slot: str | None = None) -> None:
    for _, group in _placement_groups(_group_prefix(connection_name, slot)):
        ray.util.remove_placement_group(group)


def teardown(connection_name: str, *, timeout_s: float = 30.0) -> list[str]:
    """Stop every actor of a connection: flush and close gracefully, then kill; remove
    its placement groups. Messages waiting in delay topics stay there."""
    names = actor_names(connection_name)
    # The producers first: what they flush may go to a delay topic.
    producers = [n for n in names if actor_kind(connection_name, n) != DELAY]
    _retire(producers, timeout_s=timeout_s)
    _retire([n for n in names if n not in producers], timeout_s=timeout_s)
    _remove_groups(connection_name)
    return names


# --- Reconciling: up -----------------------------------------------------------------------
Progress = Callable[[str], None]


def _actor_info(handle: Any) -> dict[str, Any]:
    """State, node and restart count of an actor as the GCS knows them (Ray has no public
    API for this without the dashboard; empty when unavailable)."""
    try:
        from ray._private.state import actors as actor_table

        info = actor_table(handle._actor_id.hex())
    except Exception:
        return {}
    return {"state": info.get("State"), "restarts": info.get("NumRestarts"),
            "node": (info.get("Address") or {}).get("NodeID") or None}


def _node(node_id: str | None) -> str:
    return node_id[:8] if node_id else "?"


def _cpus_per_node() -> list[float]:
    return [float(n.get("Resources", {}).get("CPU", 0.0))
            for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]


def _demands(settings: MessagingSettings, plan: Plan) -> list[float]:
    cpus = {PRODUCER: settings.lanes.actor_num_cpus, STAGE: 1.0,
            DELAY: settings.republisher.actor_num_cpus}
    return [cpus[c.kind] for c in plan.actors if c.action in (CREATE, REPLACE)]


def read_plan(settings: MessagingSettings, *, timeout_s: float = 30.0,
              clients: KafkaClients = AIOKAFKA) -> Plan:
    """The plan for ``settings``: the running actors (asked for their fingerprints), the
    topics on the brokers, and what waits in delay topics that would be left behind.
    Raises MessagingConnectionError when the brokers cannot be reached,
    ConfigurationError for a delay topic whose retention could lose messages."""
    topics = asyncio.run(topic_states(settings, clients=clients))
    plan = make_plan(settings, describe(settings.connection_name, timeout_s=timeout_s),
                     topics)
    gone = plan.removed_topics
    if gone:
        waiting = asyncio.run(undelivered(settings, gone, clients=clients))
        stranded = tuple((t, n) for t, n in waiting.items() if n)
        plan = Plan(plan.connection, plan.fingerprint, plan.actors, plan.topics,
                    plan.slot, plan.retire_first, stranded)
    return plan


def _await_ready(calls: Mapping[str, tuple[Any, str]], timeout_s: float,
                 progress: Progress) -> None:
    """Wait for each actor's readiness call (name -> (ref, label)), printing a line as
    each becomes ready; raise the first failure as the actor's own error."""
    pending = {ref: (name, label) for name, (ref, label) in calls.items()}
    start = time.monotonic()
    while pending:
        left = timeout_s - (time.monotonic() - start)
        if left <= 0:
            labels = ", ".join(label for _, label in list(pending.values())[:3])
            raise ConfigurationError(
                f"{len(pending)} actor(s) not running after {timeout_s:.0f}s ({labels}): "
                "the cluster has no room for them (free CPUs, placement) or they fail to "
                "start (see the actors' logs)")
        done, _ = ray.wait(list(pending), num_returns=1, timeout=left)
        for ref in done:
            name, label = pending.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                raise _unwrap(exc) from None
            except ray.exceptions.RayActorError as exc:
                raise ConfigurationError(f"{label} died while starting: "
                                         f"{str(exc).splitlines()[0]}") from None
            node = value.get("node_id") if isinstance(value, dict) else None
            if node is None:
                node = _actor_info(ray.get_actor(name, namespace=NAMESPACE)).get("node")
            where = ""
            if isinstance(value, dict) and "partitions" in value:
                where = f", partitions {value['partitions']}"
            progress(f"  ready  {label:<50} node {_node(node)}{where} "
                     f"({time.monotonic() - start:.1f}s)")


def _label(kind: str, role: str) -> str:
    return f"{kind} {role}"


def apply(settings: MessagingSettings, plan: Plan, *, progress: Progress,
          timeout_s: float = 120.0, clients: KafkaClients = AIOKAFKA) -> None:
    """Carry ``plan`` out, printing a line per step and per actor as it becomes ready.

    Order: topics; new DelayBucketActors (in the plan's slot, with a newer generation:
    they take every partition over from the old ones, which are fenced, never both
    delivering); replaced or removed ProducerActors and StageActors flush and go, and their
    successors start; last the old DelayBucketActors stop. When the new DelayBucketActors
    fail to start, they are removed and the old ones keep running.
    """
    conn = settings.connection_name
    why = missing_resources(_demands(settings, plan), _cpus_per_node())
    if why:
        raise ConfigurationError(f"not enough resources in the Ray cluster: {why}")
    if settings.delay_topics:
        asyncio.run(ensure_topics(settings, settings.delay_topics, clients=clients))
        for t in plan.topics:
            if t.action == CREATE:
                progress(f"  created topic {t.topic}")

    by_action = {a: [c for c in plan.actors if c.action == a]
                 for a in (CREATE, REPLACE, REMOVE)}
    new_delay = [c for c in by_action[CREATE] + by_action[REPLACE] if c.kind == DELAY]
    if plan.retire_first:
        progress(f"  stopping {len(plan.retire_first)} DelayBucketActor(s) to free slot "
                 f"{plan.slot}")
        _retire(plan.retire_first)
        _remove_groups(conn, plan.slot)
    if new_delay:
        in_place = [c.name for c in new_delay if c.action == REPLACE and c.old is None]
        if in_place:  # replaced under the same name: stop the old one first
            _retire(in_place)
        generation = time.time_ns() // 1_000_000
        started = _start_delay_actors(settings, plan.slot, {c.name for c in new_delay},
                                      generation, timeout_s)
        try:
            _await_ready({c.name: (started[c.name].ready.remote(timeout_s),
                                   _label(c.kind, c.role)) for c in new_delay},
                         timeout_s, progress)
        except BaseException:
            # Leave the old layout running, as it was.
            _retire(list(started), timeout_s=10.0)
            if plan.slot not in _live_slots(conn):
                _remove_groups(conn, plan.slot)
            raise

    fixed = [c for c in plan.actors if c.kind != DELAY]
    leaving = [c for c in fixed if c.action in (REPLACE, REMOVE)]
    if leaving:
        progress(f"  flushing and stopping {len(leaving)} actor(s): "
                 f"{', '.join(_label(c.kind, c.role) for c in leaving)}")
        _retire([c.name for c in leaving],
                timeout_s=settings.producer.delivery_timeout_ms / 1000 + 5)
    fresh = [c for c in fixed if c.action in (CREATE, REPLACE)]
    if fresh:
        stage_actors = apply_stage_actors(settings)
        lanes = _producer_actors(settings, stage_actors)
        handles = _handles(c.name for c in fresh)
        for kind in (STAGE, PRODUCER):  # producers call their stage actors
            _await_ready({c.name: (handles[c.name].fingerprint.remote(),
                                   _label(c.kind, c.role))
                          for c in fresh if c.kind == kind and c.name in handles},
                         timeout_s, progress)
        _check_fingerprints(settings, stage_actors + [a for group in lanes.values()
                                                      for a in group])

    old_delay = ([c.name for c in by_action[REMOVE] if c.kind == DELAY]
                 + [c.old for c in by_action[REPLACE] if c.kind == DELAY and c.old])
    if old_delay:
        progress(f"  stopping {len(old_delay)} DelayBucketActor(s) of the previous layout")
        _retire(old_delay)
    live = _live_slots(conn)
    for slot in SLOTS:
        if slot not in live:
            _remove_groups(conn, slot)


def _live_slots(connection_name: str) -> set[str | None]:
    return {name.slot for n in actor_names(connection_name, DELAY)
            if (name := parse_actor_name(connection_name, n)) is not None}


# --- Kafka: what the brokers hold ----------------------------------------------------------
async def _admin(settings: MessagingSettings, clients: KafkaClients) -> Any:
    """A started admin client within ``producer.connect_timeout_s``."""
    timeout = settings.producer.connect_timeout_s
    try:
        return await asyncio.wait_for(open_admin(settings, clients), timeout)
    except asyncio.TimeoutError:
        raise MessagingConnectionError(
            f"cannot reach the Kafka brokers at {settings.bootstrap_servers} within "
            f"{timeout:g}s (producer.connect_timeout_s)") from None


async def topic_states(settings: MessagingSettings, *, clients: KafkaClients = AIOKAFKA
                       ) -> dict[str, TopicState]:
    """The topics athomic uses itself, as the brokers describe them (missing ones left
    out)."""
    if not settings.delay_topics:
        # Still say at once when the brokers are unreachable.
        await (await _admin(settings, clients)).close()
        return {}
    admin = await _admin(settings, clients)
    try:
        names = sorted(settings.reserved_topics())
        counts = await admin.partition_counts(names)
        kept = await admin.topic_config(list(counts), "retention.ms")
        return {t: TopicState(n, int(kept[t]) if kept.get(t) not in (None, "") else None)
                for t, n in counts.items()}
    finally:
        await admin.close()


async def partition_progress(settings: MessagingSettings, *,
                             clients: KafkaClients = AIOKAFKA
                             ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per delay-topic partition: end offset, committed offset, lag (messages not yet
    republished, as far as offsets tell) and the holder named in the commit (with its
    lease time); and the dead-letter topic's depth (records not replayed yet)."""
    admin = await _admin(settings, clients)
    consumer = clients.consumer(**settings.kafka_client_options(),
                                isolation_level="read_committed")
    try:
        try:
            await consumer.start()
        except Exception as exc:
            raise MessagingConnectionError(
                f"cannot reach the Kafka brokers at {settings.bootstrap_servers}: "
                f"{type(exc).__name__}: {exc}") from None
        dlq = settings.republisher.dead_letter_topic
        counts = await admin.partition_counts([*settings.delay_topics.values(), dlq])
        rows: list[dict[str, Any]] = []
        for bucket, topic in settings.delay_topics.items():
            tps = [TopicPartition(topic, p) for p in range(counts.get(topic, 0))]
            if not tps:
                rows.append({"topic": topic, "bucket_s": bucket, "partition": None,
                             "end": 0, "committed": 0, "lag": 0, "holder": None,
                             "lease_ms": 0})
                continue
            ends = await consumer.end_offsets(tps)
            committed = await admin.committed(settings.republisher_group, tps)
            for tp in tps:
                offset, metadata = committed.get(tp, (0, ""))
                done, holder_text = decode_commit(offset, metadata)
                holder = Owner.parse(holder_text)
                rows.append({
                    "topic": topic, "bucket_s": bucket, "partition": tp.partition,
                    "end": ends[tp], "committed": offset,
                    "lag": max(ends[tp] - offset - sum(1 for d in done if d < ends[tp]), 0),
                    "holder": f"{holder.connection}@{holder.instance}" if holder else None,
                    "lease_ms": holder.lease_ms if holder else 0})
        dead = [TopicPartition(dlq, p) for p in range(counts.get(dlq, 0))]
        depth = 0
        if dead:
            ends = await consumer.end_offsets(dead)
            starts = await consumer.beginning_offsets(dead)
            replayed = await admin.committed(f"athomic.dlq-replay.{settings.connection_name}",
                                             dead)
            depth = sum(max(ends[tp] - max(starts[tp], replayed.get(tp, (0, ""))[0]), 0)
                        for tp in dead)
        return rows, {"topic": dlq, "exists": bool(dead), "depth": depth}
    finally:
        await stop_quietly(consumer, _STOP_S)
        await admin.close()


async def undelivered(settings: MessagingSettings, topics: Sequence[str], *,
                      clients: KafkaClients = AIOKAFKA, limit: int = 10_000,
                      timeout_s: float = 20.0) -> dict[str, int]:
    """Messages still waiting in each delay topic (read from the committed offset, less
    those the commit names as published; counting stops at ``limit`` per topic)."""
    admin = await _admin(settings, clients)
    reader = clients.consumer(**settings.kafka_client_options(), group_id=None,
                              enable_auto_commit=False, isolation_level="read_committed",
                              auto_offset_reset="earliest")
    try:
        await reader.start()
        counts = await admin.partition_counts(topics)
        out = {}
        for topic in topics:
            tps = [TopicPartition(topic, p) for p in range(counts.get(topic, 0))]
            if not tps:
                out[topic] = 0
                continue
            committed = await admin.committed(settings.republisher_group, tps)
            ends = await reader.end_offsets(tps)
            reader.assign(tps)
            done: dict[TopicPartition, set[int]] = {}
            for tp in tps:
                offset, metadata = committed.get(tp, (0, ""))
                done[tp] = decode_commit(offset, metadata)[0]
                reader.seek(tp, offset)
            found = 0
            deadline = time.monotonic() + timeout_s
            left = [tp for tp in tps if committed.get(tp, (0, ""))[0] < ends[tp]]
            while left and found < limit and time.monotonic() < deadline:
                batch = await reader.getmany(*left, timeout_ms=200)
                for tp, records in batch.items():
                    found += sum(1 for r in records if r.offset < ends[tp]
                                 and r.offset not in done[tp])
                left = [tp for tp in left if await reader.position(tp) < ends[tp]]
            out[topic] = min(found, limit)
        return out
    finally:
        await stop_quietly(reader, _STOP_S)
        await admin.close()


# --- status --------------------------------------------------------------------------------
def actor_reports(connection_name: str, *, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """Every running actor of a connection: kind, role, node, state and restarts (from the
    GCS), whether it answered within ``timeout_s``, its settings fingerprint and its
    ``stats()``."""
    handles = _handles(actor_names(connection_name))
    prints = _answers({n: h.fingerprint.remote() for n, h in handles.items()}, timeout_s)
    stats = _answers({n: h.stats.remote() for n, h in handles.items() if n in prints},
                     timeout_s)
    reports: list[dict[str, Any]] = []
    for name, handle in handles.items():
        parsed = parse_actor_name(connection_name, name)
        assert parsed is not None
        info = _actor_info(handle)
        fp, st = prints.get(name), stats.get(name)
        node = info.get("node") or (st.get("node_id") if isinstance(st, dict) else None)
        reports.append({
            "name": name, "kind": parsed.kind, "role": parsed.role, "lane": parsed.lane,
            "index": parsed.index, "topic": parsed.topic, "replica": parsed.replica,
            "slot": parsed.slot, "node": node, "state": info.get("state"),
            "restarts": info.get("restarts"),
            "responding": isinstance(fp, str) and isinstance(st, dict),
            "fingerprint": fp if isinstance(fp, str) else None,
            "stats": _trim(st) if isinstance(st, dict) else None})
    reports.sort(key=lambda r: (_KIND_ORDER[r["kind"]], r["lane"] != "high", r["lane"] or "",
                                r["topic"] or "", r["replica"] or 0, r["index"] or 0,
                                r["slot"] or ""))
    return reports


def _trim(stats: dict[str, Any]) -> dict[str, Any]:
    """What status shows of an actor's stats (JSON-safe: partition keys as ints)."""
    keep = ("topic", "replica", "replicas", "generation", "partition_states", "held",
            "lateness", "clock_skew_ms", "republished", "restarts", "error", "sent",
            "failed", "lane", "index", "calls", "messages")
    return {k: stats[k] for k in keep if k in stats}


def status(settings: MessagingSettings, *, timeout_s: float = 5.0,
           clients: KafkaClients = AIOKAFKA) -> dict[str, Any]:
    """A connection's health: its actors, its delay-topic partitions (owner, lag, held,
    lateness p99, clock skew), the dead-letter depth, and the problems found (empty:
    healthy)."""
    actors = actor_reports(settings.connection_name, timeout_s=timeout_s)
    # An actor that does not answer (its node lost, restarting) is reported as such, not
    # as a reason to replace the whole layout.
    fp = settings.fingerprint()
    plan = make_plan(settings, [RunningActor(a["name"], a["fingerprint"] or fp)
                                for a in actors])
    brokers_error = None
    broker_rows: list[dict[str, Any]] = []
    dlq: dict[str, Any] = {"topic": settings.republisher.dead_letter_topic, "exists": None,
                           "depth": None}
    if settings.delay_topics:
        try:
            broker_rows, dlq = asyncio.run(partition_progress(settings, clients=clients))
        except MessagingConnectionError as exc:
            brokers_error = str(exc)
    else:
        try:
            asyncio.run(topic_states(settings, clients=clients))
        except MessagingConnectionError as exc:
            brokers_error = str(exc)
    # Whoever of the connection holds a partition serves it (an old layout too, until
    # it is fenced); with the republisher outside Ray, the commits name the holder.
    holders = actors if settings.republisher.enabled else []
    rows = partition_rows(settings, broker_rows, holders, time.time_ns() // 1_000_000)
    problems = assess(settings, plan, actors, rows, brokers_error)
    return {"connection": settings.connection_name, "fingerprint": plan.fingerprint,
            "healthy": not problems, "problems": problems, "actors": actors,
            "expected": [vars(c) for c in plan.actors], "partitions": rows, "dlq": dlq}
