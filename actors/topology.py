"""Where the plain actor classes become Ray actors: names, namespace, restarts, resources.

Every actor athomic starts is a named, detached actor in the ``athomic`` namespace whose
name begins with the connection name, so any process in the cluster that asks for the same
connection gets the same actors, and ``teardown`` finds them all again.
"""

from __future__ import annotations

import contextlib
from typing import Any

import ray

from athomic.errors import ConfigurationError
from athomic.settings import MessagingSettings

from .delay_bucket import DelayBucketActor
from .producer import ProducerActor
from .stage import StageActor

NAMESPACE = "athomic"
LANES = ("high", "normal", "low")
STAGE_START_TIMEOUT_S = 120.0
"""How long ``apply_producers`` waits for the StageActor pool to be scheduled."""


def producer_actor_name(connection_name: str, lane: str, index: int) -> str:
    return f"{connection_name}.producer.{lane}.{index}"


def stage_actor_name(connection_name: str, index: int) -> str:
    return f"{connection_name}.stage.{index}"


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
    if not ray.is_initialized():
        ray.init(namespace=NAMESPACE, log_to_driver=False)


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


def delay_actor_name(connection_name: str, topic: str, replica: int) -> str:
    return f"{connection_name}.delay.{topic}.{replica}"


def apply_republisher(settings: MessagingSettings, *, timeout_s: float = 120.0
                      ) -> list[Any]:
    """Get or create the DelayBucketActors of a connection: ``republisher.replicas`` per
    delay topic, spread over the nodes, restarted by Ray without limit. Returns once each
    runs (its topics created or checked)."""
    ensure_ray()
    remote_cls = ray.remote(DelayBucketActor)
    replicas = settings.republisher.replicas
    # ready/stats/stop are idempotent: safe to retry on a restarted actor.
    actors: list[Any] = [
        remote_cls.options(**_named(delay_actor_name(settings.connection_name, topic, i)),
                           max_task_retries=-1, num_cpus=settings.republisher.actor_num_cpus,
                           scheduling_strategy="SPREAD").remote(settings, topic, i, replicas)
        for topic in settings.delay_topics.values()
        for i in range(replicas)
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


def actor_names(connection_name: str) -> list[str]:
    """Names of every live athomic actor of a connection."""
    if not ray.is_initialized():
        return []
    prefix = f"{connection_name}."
    return sorted(
        entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == NAMESPACE and entry["name"].startswith(prefix))


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
    return names
