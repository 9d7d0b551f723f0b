"""Where the plain actor classes become Ray actors: names, namespace, restarts, resources.

Every actor athomic starts is a named, detached actor in the ``athomic`` namespace whose
name begins with the connection name, so any process in the cluster that asks for the same
connection gets the same actors, and ``teardown`` finds them all again.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import ray

from athomic.errors import ConfigurationError
from athomic.settings import MessagingSettings

from .delay_bucket import DelayBucketActor
from .producer import ProducerActor
from .stage import StageActor

NAMESPACE = "athomic"
STAGE_START_TIMEOUT_S = 120.0
"""How long ``apply_producers`` waits for the StageActor pool to be scheduled."""


# --- names: <connection>.producer.<lane>.<i>, <connection>.stage.<i>,
# <connection>.delay.<delay topic>.<replica>. Only this module builds or reads them.
PRODUCER, STAGE, DELAY = "producer", "stage", "delay"


def producer_actor_name(connection_name: str, lane: str, index: int) -> str:
    return f"{connection_name}.{PRODUCER}.{lane}.{index}"


def stage_actor_name(connection_name: str, index: int) -> str:
    return f"{connection_name}.{STAGE}.{index}"


def delay_actor_name(connection_name: str, topic: str, replica: int) -> str:
    return f"{connection_name}.{DELAY}.{topic}.{replica}"


def actor_kind(connection_name: str, name: str) -> str | None:
    """``producer``, ``stage`` or ``delay`` for a name this module built for the
    connection; None for any other name."""
    prefix = f"{connection_name}."
    if not name.startswith(prefix):
        return None
    kind = name[len(prefix):].split(".", 1)[0]
    return kind if kind in (PRODUCER, STAGE, DELAY) else None


def _lane_sizes(settings: MessagingSettings) -> dict[str, int]:
    lanes = settings.lanes
    sizes = {"high": lanes.high, "normal": lanes.normal}
    if lanes.low:
        sizes["low"] = lanes.low
    return sizes


def _named(name: str) -> dict[str, Any]:
    """Options every athomic actor has: found again by name from any process, outliving
    the driver that created it, restarted by Ray without limit."""
    return {"name": name, "namespace": NAMESPACE, "lifetime": "detached",
            "get_if_exists": True, "max_restarts": -1}


def ensure_ray() -> None:
    """Start a local Ray when this process has none (athomic's actors name their own
    namespace, so the caller's driver keeps the default one)."""
    if not ray.is_initialized():
        ray.init(log_to_driver=False)


def apply_producers(settings: MessagingSettings) -> dict[str, list[Any]]:
    """Get or create the ProducerActors of ``settings.connection_name``, by lane.

    Raises ConfigurationError when actors of that connection already run with different
    settings (call ``ProducerFactory.shutdown`` first to change them).
    """
    ensure_ray()
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
    remote_cls = ray.remote(ProducerActor)
    lanes: dict[str, list[Any]] = {}
    for lane, count in _lane_sizes(settings).items():
        # A call caught by an actor or node failure is retried on the restarted actor,
        # with the same message id: at-least-once, deduplicable.
        lanes[lane] = [
            remote_cls.options(**_named(producer_actor_name(settings.connection_name, lane, i)),
                               max_task_retries=-1, num_cpus=settings.lanes.actor_num_cpus,
                               max_concurrency=10_000).remote(settings, lane, i, stage_actors)
            for i in range(count)
        ]
    _check_fingerprints(settings, [a for group in lanes.values() for a in group]
                        + stage_actors)
    return lanes


def _check_fingerprints(settings: MessagingSettings, actors: list[Any]) -> None:
    expected = settings.fingerprint()
    found = ray.get([a.fingerprint.remote() for a in actors])
    if any(fp != expected for fp in found):
        raise ConfigurationError(
            f"actors for connection {settings.connection_name!r} already run with "
            "different settings; call ProducerFactory.shutdown("
            f"{settings.connection_name!r}) first, or use another connection_name")


def _group_prefix(connection_name: str) -> str:
    return f"athomic:{connection_name}:"


def spread(settings: MessagingSettings, count: int, *, timeout_s: float = 120.0
           ) -> list[Any]:
    """Scheduling strategies for ``count`` DelayBucketActors: the bundles of one SPREAD
    placement group, so consecutive replicas sit on different nodes whenever there are
    several, and Ray re-places a lost node's bundle (and restarts its actor) on another
    node. One node: default scheduling, no group."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    alive = [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
    if len(alive) < 2 or count == 0:
        return ["DEFAULT"] * count
    cpus = max(settings.republisher.actor_num_cpus, 0.001)
    name = f"{_group_prefix(settings.connection_name)}{settings.fingerprint()}:{count}"
    group = _placement_group(name)
    if group is None:
        group = placement_group([{"CPU": cpus}] * count, strategy="SPREAD", name=name,
                                lifetime="detached")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(group)
        raise ConfigurationError(
            f"the {count} DelayBucketActors of connection {settings.connection_name!r} "
            f"could not be placed within {timeout_s:.0f}s: each needs {cpus} CPU on some "
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


def apply_republisher(settings: MessagingSettings, *, timeout_s: float = 120.0
                      ) -> list[Any]:
    """Get or create the DelayBucketActors of a connection: ``republisher.replicas`` per
    delay topic, spread over the nodes (``spread``), restarted by Ray without limit.
    Returns once each runs (its topics created or checked)."""
    ensure_ray()
    remote_cls = ray.remote(DelayBucketActor)
    replicas = settings.republisher.replicas
    slots = [(topic, i) for topic in settings.delay_topics.values() for i in range(replicas)]
    # A newer layout wins a partition over an older one still running (ownership, see
    # republisher.loop); actors that already run keep their generation.
    generation = time.time_ns() // 1_000_000
    # ready/stats/stop are idempotent: safe to retry on a restarted actor.
    actors: list[Any] = [
        remote_cls.options(**_named(delay_actor_name(settings.connection_name, topic, i)),
                           max_task_retries=-1, num_cpus=settings.republisher.actor_num_cpus,
                           scheduling_strategy=strategy).remote(settings, topic, i, replicas,
                                                                generation=generation)
        for (topic, i), strategy in zip(slots, spread(settings, len(slots), timeout_s=timeout_s),
                                        strict=True)
    ]
    _check_fingerprints(settings, actors)
    ray.get([a.ready.remote(timeout_s) for a in actors])
    return actors


def apply_stage_actors(settings: MessagingSettings) -> list[Any]:
    """Get or create the StageActor pool of a connection (none unless a pipeline stage is
    placed on actors). Each replica reserves one CPU, so Ray spreads them over the
    cluster's nodes and cores."""
    specs = [s for s in settings.pipeline
             if s.stage != "serialize" and s.placement == "actors"]
    if not specs:
        return []
    remote_cls = ray.remote(StageActor)
    # Encoding is a pure function of its input: retrying after a restart is safe.
    return [
        remote_cls.options(**_named(stage_actor_name(settings.connection_name, i)),
                           max_task_retries=3, num_cpus=1).remote(settings, i)
        for i in range(specs[0].replicas)
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


def teardown(connection_name: str, *, timeout_s: float = 30.0) -> list[str]:
    """Stop every actor of a connection: flush and close gracefully, then kill."""
    names = actor_names(connection_name)
    handles: list[Any] = []
    for name in names:
        with contextlib.suppress(ValueError):
            handles.append(ray.get_actor(name, namespace=NAMESPACE))
    stops: list[Any] = [h.stop.remote() for h in handles]
    if stops:
        ray.wait(stops, num_returns=len(stops), timeout=timeout_s)
    for h in handles:
        ray.kill(h, no_restart=True)
    for _, group in _placement_groups(_group_prefix(connection_name)):
        ray.util.remove_placement_group(group)
    return names
