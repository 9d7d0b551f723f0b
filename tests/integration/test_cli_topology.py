"""``athomic up / status / down`` against the test session's local Ray and broker: the
command runs as its own process (a driver joining the cluster), as users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import ray
from helpers import create_topics, read_timed

from athomic import (
    ConfigurationError,
    MessagingConnectionError,
    MessagingSettings,
    ProducerFactory,
    PublishingOutcome,
)
from athomic.actors.topology import actor_names

pytestmark = pytest.mark.integration


@pytest.fixture
def cli(ray_session: Any) -> Any:
    """Runs ``athomic ...`` in a new process joined to the session's Ray."""
    address = ray.get_runtime_context().gcs_address

    def run(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
        extra = ["--address", address] if args[0] in ("up", "down", "status") else []
        return subprocess.run([sys.executable, "-m", "athomic", *args, *extra],
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def write_config(tmp_path: Path, kafka_bootstrap: str, connection_name: str) -> Any:
    path = tmp_path / "athomic.toml"

    def write(buckets: dict[int, str], *, bootstrap: str = kafka_bootstrap,
              extra: str = "", republisher: str = "") -> Path:
        path.write_text(
            f'connection_name = "{connection_name}"\nbootstrap_servers = "{bootstrap}"\n'
            f"{extra}\n[delay_topics]\n"
            + "".join(f'{b} = "{t}"\n' for b, t in buckets.items())
            + f"[republisher]\npartitions = 2\n{republisher}\n")
        return path

    return write


@pytest.fixture
def buckets() -> dict[int, str]:
    tag = uuid.uuid4().hex[:8]
    return {1: f"cli.{tag}.1s", 10: f"cli.{tag}.10s"}


@pytest.fixture
def stopped(connection_name: str, ray_session: Any) -> Any:
    """Whatever a test starts for its connection is stopped afterwards."""
    yield
    ProducerFactory.shutdown(connection_name)


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one line, ``athomic: ...``, and nothing else
    (no Kafka client log lines, no traceback)."""
    assert out.returncode != 0, out.stdout
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("athomic: "), out.stderr[-3000:]
    return lines[0]


@pytest.mark.timeout(300)
async def test_up_twice_create_finds_them_change_status_down(
        cli: Any, write_config: Any, buckets: dict[int, str], connection_name: str,
        kafka_bootstrap: str, topic: str, stopped: None) -> None:
    config = write_config(buckets)
    dry = cli("up", "--config", str(config), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "+ create" in dry.stdout and "Dry run" in dry.stdout
    assert actor_names(connection_name) == []

    up = cli("up", "--config", str(config))
    assert up.returncode == 0, up.stdout + up.stderr
    assert up.stdout.count("  ready  ") == 4, up.stdout  # high, normal, two buckets
    names = actor_names(connection_name)
    assert len(names) == 4

    again = cli("up", "--config", str(config))
    assert again.returncode == 0, again.stderr
    assert "No changes" in again.stdout and "+ create" not in again.stdout
    assert "Plan: 0 to create, 0 to replace, 0 to remove" in again.stdout

    # a driver building its settings from the same file finds the same actors
    await create_topics(kafka_bootstrap, topic)
    handle = ProducerFactory.create(MessagingSettings.from_toml(config))
    assert actor_names(connection_name) == names
    assert ray.get(handle.publish.remote(topic=topic, message={"n": 0}, key="k",
                                         message_id=f"{topic}-0")) is \
        PublishingOutcome.SUCCESS_DIRECT
    assert ray.get(handle.publish.remote(topic=topic, message={"n": 1}, key="k",
                                         delay_seconds=1.5, message_id=f"{topic}-1")) is \
        PublishingOutcome.SUCCESS_DELAYED

    status = cli("status", "--config", str(config), "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["healthy"] and report["problems"] == []
    assert sorted(a["kind"] for a in report["actors"]) == ["delay", "delay", "producer",
                                                           "producer"]
    assert all(a["state"] == "ALIVE" and a["node"] for a in report["actors"])
    assert {(p["topic"], p["partition"]) for p in report["partitions"]} == {
        (t, p) for t in buckets.values() for p in (0, 1)}
    assert all(p["owner"] for p in report["partitions"])
    text = cli("status", "--config", str(config))
    assert text.returncode == 0 and "healthy" in text.stdout

    # the file changes: drivers are told to run up; status says so too
    buckets[4] = buckets[10].replace("10s", "4s")
    config = write_config(buckets, republisher="replicas = 2")
    with pytest.raises(ConfigurationError, match="athomic up"):
        ProducerFactory.create(MessagingSettings.from_toml(config))
    stale = cli("status", "--config", str(config))
    assert stale.returncode == 1 and "run athomic up" in stale.stdout

    up = cli("up", "--config", str(config))
    assert up.returncode == 0, up.stdout + up.stderr
    assert "~ replace" in up.stdout and "+ create" in up.stdout
    handle = ProducerFactory.create(MessagingSettings.from_toml(config))
    delay_names = actor_names(connection_name, "delay")
    assert len(delay_names) == 3 * 2 and all(".delay.b." in n for n in delay_names)
    assert ray.get(handle.publish.remote(topic=topic, message={"n": 2}, key="k",
                                         delay_seconds=2.5, message_id=f"{topic}-2")) is \
        PublishingOutcome.SUCCESS_DELAYED

    received = await read_timed(kafka_bootstrap, topic, 3, timeout=60, extra_wait=2.0)
    ids = sorted(dict(r.headers)["message-id"].decode() for r, _ in received)
    assert ids == [f"{topic}-{i}" for i in range(3)]
    for record, at in received:
        due = dict(record.headers).get("athomic-deliver-at")
        assert due is None or at * 1000 >= int(due)

    down = cli("down", "--config", str(config))
    assert down.returncode == 0, down.stderr
    assert actor_names(connection_name) == []
    gone = cli("status", "--config", str(config), "--json")
    assert gone.returncode == 1
    assert "delay " in " ".join(json.loads(gone.stdout)["problems"])
    nothing = cli("down", "--connection", connection_name)
    assert nothing.returncode == 0 and "Nothing runs" in nothing.stdout


@pytest.mark.timeout(300)
async def test_removing_a_bucket_that_still_holds_messages_is_refused(
        cli: Any, write_config: Any, buckets: dict[int, str], connection_name: str,
        kafka_bootstrap: str, topic: str, stopped: None) -> None:
    config = write_config(buckets)
    assert cli("up", "--config", str(config)).returncode == 0
    await create_topics(kafka_bootstrap, topic)
    handle = ProducerFactory.create(MessagingSettings.from_toml(config))
    ray.get(handle.publish.remote(topic=topic, message={"n": 1}, delay_seconds=60))
    fewer = write_config({1: buckets[1]})
    refused = cli("up", "--config", str(fewer))
    line = one_line_error(refused)
    assert f"{buckets[10]} (1)" in line and "--force" in line
    assert f"! {buckets[10]} is no longer configured and still holds 1" in refused.stdout
    assert len(actor_names(connection_name, "delay")) == 2, "nothing changed"


@pytest.mark.timeout(120)
def test_up_fails_fast_with_one_clear_line(cli: Any, write_config: Any,
                                           buckets: dict[int, str], connection_name: str,
                                           kafka_bootstrap: str, tmp_path: Path) -> None:
    # brokers unreachable: at once, not after a timeout; no Kafka client log lines
    start = time.monotonic()
    line = one_line_error(cli("up", "--config", str(
        write_config(buckets, bootstrap="127.0.0.1:1"))))
    assert "cannot reach the Kafka brokers at 127.0.0.1:1" in line
    assert time.monotonic() - start < 30
    # bad settings
    line = one_line_error(cli("up", "--config", str(write_config(buckets, extra="x = 1"))))
    assert line.startswith("athomic: invalid athomic settings: x:")
    bad = tmp_path / "bad.toml"
    bad.write_text("connection_name = \n")
    assert "not valid TOML" in one_line_error(cli("up", "--config", str(bad)))
    missing = cli("up")
    assert missing.returncode == 2 and "ATHOMIC_CONFIG" in missing.stderr
    # not enough resources
    line = one_line_error(cli("up", "--config", str(
        write_config(buckets, extra="[lanes]\nactor_num_cpus = 64"))))
    assert "not enough resources" in line
    # no Ray cluster there
    line = one_line_error(subprocess.run(
        [sys.executable, "-m", "athomic", "status", "--config", str(write_config(buckets)),
         "--address", "127.0.0.1:1"], capture_output=True, text=True, timeout=60))
    assert "cannot join the Ray cluster at 127.0.0.1:1" in line
    assert actor_names(connection_name) == []


@pytest.mark.timeout(120)
async def test_too_short_retention_is_one_line(cli: Any, write_config: Any,
                                               buckets: dict[int, str],
                                               kafka_bootstrap: str) -> None:
    await create_topics(kafka_bootstrap, buckets[10], partitions=2,
                        config={"retention.ms": "60000"})
    line = one_line_error(cli("up", "--config", str(write_config(buckets))))
    assert f"delay topic '{buckets[10]}' keeps records 60000 ms" in line


@pytest.mark.timeout(120)
def test_create_and_republisher_run_fail_fast_without_brokers(
        settings_factory: Any, write_config: Any, buckets: dict[int, str]) -> None:
    settings = settings_factory(bootstrap_servers="127.0.0.1:1", delay_topics=buckets)
    start = time.monotonic()
    with pytest.raises(MessagingConnectionError, match=r"127\.0\.0\.1:1"):
        ProducerFactory.create(settings)
    assert time.monotonic() - start < 30, "known at once, not after the 120 s timeout"

    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "athomic", "republisher", "run", "--config",
                          str(write_config(buckets, bootstrap="127.0.0.1:1"))],
                         capture_output=True, text=True, timeout=90)
    line = one_line_error(run)
    assert "cannot reach the Kafka brokers at 127.0.0.1:1" in line
    assert "republishing" not in run.stdout
    assert time.monotonic() - start < 30


def test_python_m_athomic_lists_the_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "athomic", "--help"], capture_output=True,
                         text=True, timeout=60, check=True)
    for command in ("up", "down", "status", "republisher", "dlq", "cancel"):
        assert command in out.stdout
    up = subprocess.run([sys.executable, "-m", "athomic", "up", "--help"],
                        capture_output=True, text=True, timeout=60, check=True)
    assert "--dry-run" in up.stdout and "--address" in up.stdout


def test_a_dashboard_address_is_refused_with_a_hint(write_config: Any,
                                                    buckets: dict[int, str]) -> None:
    out = subprocess.run([sys.executable, "-m", "athomic", "status", "--config",
                          str(write_config(buckets)), "--address", "http://127.0.0.1:8265"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "dashboard address" in out.stderr


async def test_athomic_cancel_from_a_shell_means_never_delivered(
        write_config: Any, buckets: dict[int, str], kafka_bootstrap: str, topic: str,
        stopped: Any) -> None:
    """``athomic cancel --config FILE ID`` (no Ray in that process) is acknowledged before
    it returns; the message it names is never delivered, the other one is."""
    config = write_config(buckets)
    handle = ProducerFactory.create(MessagingSettings.from_toml(config))
    for name in ("keep", "drop"):
        assert ray.get(handle.publish.remote(topic=topic, message={"id": name}, key=name,
                                             delay_seconds=4, message_id=name)) is \
            PublishingOutcome.SUCCESS_DELAYED
    out = subprocess.run([sys.executable, "-m", "athomic", "cancel", "--config", str(config),
                          "drop"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stderr
    received = await read_timed(kafka_bootstrap, topic, 1, timeout=30, extra_wait=3.0)
    assert [dict(r.headers)["message-id"] for r, _ in received] == [b"keep"]
