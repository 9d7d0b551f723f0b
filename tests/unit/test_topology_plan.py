"""The plan behind ``athomic up`` and the health behind ``athomic status``: pure functions
of the settings, the running actors and what the brokers hold (no Ray, no Kafka)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from athomic import MessagingSettings
from athomic.actors.topology import (
    CREATE,
    DELAY,
    PRODUCER,
    REMOVE,
    REPLACE,
    STAGE,
    UNCHANGED,
    ActorName,
    RunningActor,
    TopicState,
    actor_kind,
    assess,
    delay_actor_name,
    desired_actors,
    make_plan,
    missing_resources,
    parse_actor_name,
    partition_rows,
    producer_actor_name,
    stage_actor_name,
)
from athomic.errors import ConfigurationError

WEEK_MS = 7 * 86_400_000
KEY = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE="  # 32 bytes, base64


def settings(**overrides: Any) -> MessagingSettings:
    values: dict[str, Any] = {"connection_name": "orders",
                              "delay_topics": {1: "d.1s", 10: "d.10s"}}
    values.update(overrides)
    return MessagingSettings(**values)


def running(s: MessagingSettings, slot: str = "a", fingerprint: str | None = None
            ) -> list[RunningActor]:
    """The actors ``s`` calls for, as they run after an ``up`` (delay actors in ``slot``)."""
    fp = s.fingerprint() if fingerprint is None else fingerprint
    out = []
    for want in desired_actors(s):
        if want.kind == DELAY:
            want = ActorName(DELAY, topic=want.topic, replica=want.replica, slot=slot)
        out.append(RunningActor(want.name(s.connection_name), fp))
    return out


def by_action(plan: Any) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for c in plan.actors:
        out.setdefault(c.action, []).append((c.kind, c.role))
    return out


def all_topics(s: MessagingSettings) -> dict[str, TopicState]:
    return {t: TopicState(3, WEEK_MS) for t in s.reserved_topics()}


# --- names ---------------------------------------------------------------------------------
def test_names_round_trip_and_ignore_other_connections() -> None:
    names = [producer_actor_name("orders", "high", 0), stage_actor_name("orders", 2),
             delay_actor_name("orders", "athomic.delay.1m", 3, "b")]
    parsed = [parse_actor_name("orders", n) for n in names]
    assert parsed == [ActorName(PRODUCER, lane="high", index=0), ActorName(STAGE, index=2),
                      ActorName(DELAY, topic="athomic.delay.1m", replica=3, slot="b")]
    assert [p.name("orders") for p in parsed if p] == names
    assert [actor_kind("orders", n) for n in names] == [PRODUCER, STAGE, DELAY]
    # another connection whose name starts the same, and names athomic never builds
    assert actor_kind("orders", "orders.eu.producer.high.0") is None
    assert actor_kind("orders", "ordersx.producer.high.0") is None
    assert actor_kind("orders", "orders.delay.c.t.0") is None
    assert actor_kind("orders", "orders.producer.urgent.0") is None
    assert actor_kind("orders", "orders.stage.x") is None


# --- plans ---------------------------------------------------------------------------------
def test_an_empty_cluster_gets_everything_created() -> None:
    s = settings(lanes={"high": 1, "normal": 2}, republisher={"replicas": 2})
    plan = make_plan(s, [], {})
    assert by_action(plan) == {CREATE: [
        (PRODUCER, "high 0"), (PRODUCER, "normal 0"), (PRODUCER, "normal 1"),
        (DELAY, "d.1s replica 0"), (DELAY, "d.1s replica 1"),
        (DELAY, "d.10s replica 0"), (DELAY, "d.10s replica 1")]}
    assert plan.slot == "a" and plan.fingerprint == s.fingerprint()
    assert {t.topic for t in plan.topics if t.action == CREATE} == set(s.reserved_topics())
    text = "\n".join(plan.render())
    assert "+ create" in text and "d.10s replica 1" in text
    topics = len(s.reserved_topics())  # delay topics, dead letters, athomic's own
    assert f"Plan: {7 + topics} to create, 0 to replace, 0 to remove, 0 unchanged." in text
    json.dumps(plan.as_dict())


def test_the_same_settings_twice_change_nothing() -> None:
    s = settings()
    plan = make_plan(s, running(s), all_topics(s))
    assert plan.changes == 0
    assert {c.action for c in plan.actors} == {UNCHANGED}
    assert {t.action for t in plan.topics} == {UNCHANGED}
    assert all(line.startswith(("topics", "actors", "  = ", "Plan:"))
               for line in plan.render())
    # after a layout change the actors sit in slot b: still nothing to do
    assert make_plan(s, running(s, slot="b"), all_topics(s)).changes == 0


def test_more_replicas_and_a_new_bucket_start_a_new_layout_in_the_other_slot() -> None:
    old = settings()
    new = settings(delay_topics={1: "d.1s", 10: "d.10s", 60: "d.1m"},
                   republisher={"replicas": 2})
    plan = make_plan(new, running(old), all_topics(old))
    assert plan.slot == "b" and plan.retire_first == ()
    actions = by_action(plan)
    assert actions[REPLACE] == [(PRODUCER, "high 0"), (PRODUCER, "normal 0"),
                                (DELAY, "d.1s replica 0"), (DELAY, "d.10s replica 0")]
    assert actions[CREATE] == [(DELAY, "d.1s replica 1"), (DELAY, "d.10s replica 1"),
                               (DELAY, "d.1m replica 0"), (DELAY, "d.1m replica 1")]
    assert REMOVE not in actions
    # the new delay actors take over from the old ones, which run until they are ready
    moved = {c.name: c.old for c in plan.actors if c.kind == DELAY and c.action == REPLACE}
    assert moved == {delay_actor_name("orders", t, 0, "b"): delay_actor_name("orders", t, 0, "a")
                     for t in ("d.1s", "d.10s")}
    # producers are replaced under their own names (a driver finds them again)
    assert all(c.old is None for c in plan.actors if c.kind == PRODUCER)
    assert [t.topic for t in plan.topics if t.action == CREATE] == ["d.1m"]
    assert "~ replace" in "\n".join(plan.render())


def test_fewer_replicas_remove_the_extra_ones_after_the_new_layout_runs() -> None:
    old = settings(republisher={"replicas": 3})
    new = settings(republisher={"replicas": 1})
    plan = make_plan(new, running(old, slot="b"), all_topics(old))
    assert plan.slot == "a"
    assert sorted(by_action(plan)[REMOVE]) == [
        (DELAY, "d.10s replica 1"), (DELAY, "d.10s replica 2"),
        (DELAY, "d.1s replica 1"), (DELAY, "d.1s replica 2")]
    assert all(c.name.startswith("orders.delay.b.") for c in plan.actors
               if c.action == REMOVE)
    assert plan.removed_topics == []  # every bucket is still configured


def test_a_bucket_removed_is_named_so_its_waiting_messages_can_be_checked() -> None:
    old = settings()
    new = settings(delay_topics={1: "d.1s"})
    plan = make_plan(new, running(old), all_topics(old))
    assert plan.removed_topics == ["d.10s"]
    assert (DELAY, "d.10s replica 0") in by_action(plan)[REMOVE]


def test_a_missing_delay_actor_is_added_to_the_running_layout() -> None:
    s = settings(republisher={"replicas": 2})
    actors = [a for a in running(s, slot="b") if not a.name.endswith("d.10s.1")]
    plan = make_plan(s, actors, all_topics(s))
    assert plan.slot == "b"
    assert [(c.action, c.name, c.why) for c in plan.actors if c.action != UNCHANGED] == [
        (CREATE, delay_actor_name("orders", "d.10s", 1, "b"), "missing")]


def test_actors_that_do_not_answer_are_replaced() -> None:
    s = settings()
    actors = [RunningActor(a.name, None if ".normal." in a.name or ".d.1s." in a.name
                           else a.fingerprint) for a in running(s)]
    plan = make_plan(s, actors, all_topics(s))
    replaced = {(c.kind, c.role): c.why for c in plan.actors if c.action == REPLACE}
    assert replaced[(PRODUCER, "normal 0")] == "not responding"
    assert replaced[(DELAY, "d.1s replica 0")] == "not responding"
    # a delay layout is replaced as a whole, in the other slot
    assert replaced[(DELAY, "d.10s replica 0")] == "new layout"
    assert plan.slot == "b"


def test_an_interrupted_up_is_completed_not_started_over() -> None:
    old, new = settings(), settings(republisher={"replicas": 2})
    half = [a for a in running(new, slot="b") if not a.name.endswith(".1")]
    plan = make_plan(new, running(old, slot="a") + half, all_topics(new))
    assert plan.slot == "b"
    actions = by_action(plan)
    assert sorted(actions[CREATE]) == [(DELAY, "d.10s replica 1"), (DELAY, "d.1s replica 1")]
    assert all(c.name.startswith("orders.delay.a.") for c in plan.actors
               if c.kind == DELAY and c.action == REMOVE)
    assert len([c for c in plan.actors if c.kind == DELAY and c.action == REMOVE]) == 2


def test_both_slots_taken_by_other_settings_frees_one_first() -> None:
    v1, v2 = settings(), settings(republisher={"replicas": 2})
    v3 = settings(republisher={"replicas": 3})
    plan = make_plan(v3, running(v1, slot="a") + running(v2, slot="b"), all_topics(v3))
    assert plan.slot == "a"  # the emptier slot, stopped before the new layout starts
    assert set(plan.retire_first) == {delay_actor_name("orders", t, 0, "a")
                                      for t in ("d.1s", "d.10s")}
    assert len([c for c in plan.actors if c.kind == DELAY and c.action != REMOVE]) == 6


def test_republisher_disabled_removes_the_delay_actors() -> None:
    old = settings()
    new = settings(republisher={"enabled": False})
    plan = make_plan(new, running(old), all_topics(old))
    assert sorted(by_action(plan)[REMOVE]) == [(DELAY, "d.10s replica 0"),
                                               (DELAY, "d.1s replica 0")]
    assert plan.removed_topics == []  # still configured: a standalone republisher runs them


def test_lanes_shrinking_remove_producers() -> None:
    old = settings(lanes={"normal": 3, "low": 1})
    new = settings(lanes={"normal": 1})
    plan = make_plan(new, running(old), all_topics(old))
    assert sorted(by_action(plan)[REMOVE]) == [(PRODUCER, "low 0"), (PRODUCER, "normal 1"),
                                               (PRODUCER, "normal 2")]


def test_a_missing_stage_actor_replaces_the_producers_that_held_it() -> None:
    s = settings(pipeline=[{"stage": "serialize"},
                           {"stage": "compress", "placement": "actors", "replicas": 2}])
    actors = [a for a in running(s) if a.name != stage_actor_name("orders", 1)]
    plan = make_plan(s, actors, all_topics(s))
    changed = {(c.kind, c.role): (c.action, c.why) for c in plan.actors
               if c.action != UNCHANGED}
    assert changed == {(STAGE, "1"): (CREATE, ""),
                       (PRODUCER, "high 0"): (REPLACE, "stage actors replaced"),
                       (PRODUCER, "normal 0"): (REPLACE, "stage actors replaced")}


def test_a_delay_topic_keeping_records_too_briefly_is_refused() -> None:
    s = settings()
    topics = all_topics(s) | {"d.10s": TopicState(3, 60_000)}
    with pytest.raises(ConfigurationError, match=r"'d.10s' keeps records 60000 ms"):
        make_plan(s, running(s), topics)
    forever = all_topics(s) | {"d.10s": TopicState(6, -1)}
    rows = {t.topic: t.detail for t in make_plan(s, running(s), forever).topics}
    assert rows["d.10s"] == "6 partitions, keeps forever"


def test_created_delay_topics_have_one_partition_per_replica() -> None:
    """Each partition is a transaction stream of its own: by default no more of them
    than replicas to run them; more replicas than partitions are shown as idle."""
    for rep, expected in (({}, 1), ({"replicas": 3}, 3), ({"replicas": 2, "partitions": 6}, 6)):
        s = settings(republisher=rep)
        rows = {t.topic: t.detail for t in make_plan(s, [], {}).topics}
        assert rows["d.10s"].startswith(f"{expected} partition{'s' * (expected > 1)}, keeps")
    s = settings(republisher={"replicas": 3})
    existing = all_topics(s) | {"d.10s": TopicState(1, -1)}
    rows = {t.topic: t.detail for t in make_plan(s, running(s), existing).topics}
    assert rows["d.10s"] == ("1 partition, keeps forever; 2 of 3 replicas own no "
                             "partition (add partitions to use them)")


def test_without_delay_topics_no_topic_is_planned() -> None:
    s = settings(delay_topics={})
    plan = make_plan(s, [], {})
    assert plan.topics == ()
    assert {c.kind for c in plan.actors} == {PRODUCER}


def test_missing_resources() -> None:
    assert missing_resources([0, 0, 0.1], [1, 1]) is None
    assert missing_resources([2], [1, 1]) == "an actor needs 2 CPU and the largest node has 1"
    assert missing_resources([1, 1, 1], [1, 1]) == ("the actors need 3 CPUs and the "
                                                    "cluster has 2")
    assert missing_resources([], []) is None


# --- health --------------------------------------------------------------------------------
def delay_report(s: MessagingSettings, topic: str, owned: dict[int, str], *,
                 skew: float | None = 3.0, generation: int = 1) -> dict[str, Any]:
    name = delay_actor_name(s.connection_name, topic, 0)
    return {"name": name, "kind": DELAY, "role": f"{topic} replica 0", "node": "n1",
            "state": "ALIVE", "responding": True, "fingerprint": s.fingerprint(),
            "stats": {"topic": topic, "generation": generation, "clock_skew_ms": skew,
                      "lateness": {"p99_s": 0.012},
                      "partition_states": {p: {"state": st, "note": "", "held": 2}
                                           for p, st in owned.items()}}}


def broker_rows(topic: str, partitions: int) -> list[dict[str, Any]]:
    return [{"topic": topic, "bucket_s": 1, "partition": p, "end": 10, "committed": 10,
             "lag": 0, "holder": None, "lease_ms": 0} for p in range(partitions)]


def health(s: MessagingSettings, reports: list[dict[str, Any]],
           rows: list[dict[str, Any]], **kw: Any) -> tuple[list[dict[str, Any]], list[str]]:
    others = [{"name": a.name, "kind": PRODUCER, "role": "", "state": "ALIVE",
               "responding": True, "fingerprint": a.fingerprint, "stats": {}}
              for a in running(s) if ".producer." in a.name]
    actors = others + reports
    plan = make_plan(s, [RunningActor(a["name"], a["fingerprint"]) for a in actors])
    joined = partition_rows(s, rows, actors, now_ms=1_000_000)
    return joined, assess(s, plan, actors, joined, **kw)


def test_healthy_when_every_partition_has_an_owner() -> None:
    s = settings(delay_topics={1: "d.1s"})
    rows, problems = health(s, [delay_report(s, "d.1s", {0: "owned", 1: "owned"})],
                            broker_rows("d.1s", 2))
    assert problems == []
    assert rows[0]["owner"] == delay_actor_name("orders", "d.1s", 0)
    assert rows[0]["held"] == 2 and rows[0]["lateness_p99_ms"] == 12.0
    assert rows[0]["clock_skew_ms"] == 3.0


def test_unhealthy_partition_unowned_refused_skew_brokers_missing_actor() -> None:
    s = settings(delay_topics={1: "d.1s"}, republisher={"max_clock_skew_ms": 100})
    report = delay_report(s, "d.1s", {0: "owned", 1: "released", 2: "refused"}, skew=-250)
    report["stats"]["partition_states"][2]["note"] = "owned by connection 'other'"
    _, problems = health(s, [report], broker_rows("d.1s", 3), brokers_error="refused")
    assert problems[0] == "brokers unreachable: refused"
    assert any("clock -250 ms off" in p for p in problems)
    assert "d.1s partition 1: no owner" in problems
    assert "d.1s partition 2: refused, owned by connection 'other'" in problems
    _, problems = health(s, [], broker_rows("d.1s", 1))
    assert "delay d.1s replica 0: missing" in problems
    assert "d.1s partition 0: no owner" in problems


def test_an_actor_that_does_not_answer_or_is_restarting_is_unhealthy() -> None:
    s = settings(delay_topics={1: "d.1s"})
    report = delay_report(s, "d.1s", {0: "owned"})
    report.update(state="RESTARTING")
    _, problems = health(s, [report], broker_rows("d.1s", 1))
    assert problems == ["delay d.1s replica 0: RESTARTING"]


def test_a_standalone_republisher_owns_partitions_by_its_fresh_lease() -> None:
    s = settings(delay_topics={1: "d.1s"}, republisher={"enabled": False})
    rows = broker_rows("d.1s", 2)
    rows[0].update(holder="orders@ab12cd34", lease_ms=999_000)  # fresh
    rows[1].update(holder="orders@ab12cd34", lease_ms=1_000)  # long gone
    joined, problems = health(s, [], rows)
    assert joined[0]["owner"] == "process orders@ab12cd34"
    assert problems == ["d.1s partition 1: no owner"]


def test_a_missing_topic_is_a_problem() -> None:
    s = settings(delay_topics={1: "d.1s"})
    missing = [{"topic": "d.1s", "bucket_s": 1, "partition": None, "end": 0, "committed": 0,
                "lag": 0, "holder": None, "lease_ms": 0}]
    _, problems = health(s, [delay_report(s, "d.1s", {})], missing)
    assert problems == ["d.1s: topic does not exist (run athomic up)"]


def test_actors_running_other_settings_say_run_athomic_up() -> None:
    s = settings(delay_topics={1: "d.1s"})
    report = delay_report(s, "d.1s", {0: "owned"})
    report["fingerprint"] = "0000000000000000"
    _, problems = health(s, [report], broker_rows("d.1s", 1))
    assert problems == ["delay d.1s replica 0: settings changed (run athomic up)"]


def test_the_plan_uses_the_settings_fingerprint_from_a_file(tmp_path: Any) -> None:
    path = tmp_path / "athomic.toml"
    path.write_text('connection_name = "orders"\n[delay_topics]\n1 = "d.1s"\n10 = "d.10s"\n'
                    f'[[pipeline]]\nstage = "serialize"\n[[pipeline]]\nstage = "encrypt"\n'
                    f'primary = "k1"\nkeys = {{k1 = "{KEY}"}}\n')
    from_file = MessagingSettings.from_toml(path)
    plan = make_plan(from_file, running(from_file), all_topics(from_file))
    assert plan.fingerprint == MessagingSettings.from_toml(path).fingerprint()
    assert plan.changes == 0
