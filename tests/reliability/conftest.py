"""The reliability suite: faults on a real 3-broker Kafka and a real 3-node Ray cluster.

Not part of ``make test``: the tests here are collected only when the run asks for them,
by path (``pytest tests/reliability``, which ``make reliability`` runs) or by marker
(``-m reliability``). A run of the whole tree (``pytest``, testpaths ``tests``) skips the
directory without a line of output. Every test here is marked ``reliability``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent


def _selected(config: pytest.Config) -> bool:
    expr = config.getoption("markexpr", "") or ""
    if "reliability" in expr and "not reliability" not in expr:
        return True
    for arg in config.args:
        path = Path(arg.split("::", 1)[0])
        path = (path if path.is_absolute() else Path(config.invocation_params.dir) / path
                ).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.name.startswith("test_") and not _selected(config):
        return True
    return None


@pytest.fixture(scope="session")
def kafka_rig() -> Iterator[Any]:
    from rig import KafkaRig, log

    rig = KafkaRig()
    rig.stop()  # whatever a crashed earlier session left on this port
    log(f"starting a 3-broker Kafka on port {rig.port}")
    rig.start()
    try:
        yield rig
    finally:
        rig.stop()


@pytest.fixture(scope="session")
def ray_rig() -> Iterator[Any]:
    from rig import RayRig

    rig = RayRig()
    try:
        yield rig
    finally:
        rig.stop()


@pytest.fixture
def scenario(kafka_rig: Any, ray_rig: Any) -> Iterator[Callable[..., Any]]:
    """``scenario(name, **republisher_settings)`` -> a Run, torn down after the test (its
    actors stopped, its checker ended, the brokers healed)."""
    from rig import Run

    made: list[Any] = []

    def make(name: str, **republisher: Any) -> Any:
        run = Run(name, kafka_rig, ray_rig, republisher)
        made.append(run)
        return run

    try:
        yield make
    finally:
        for run in made:
            run.teardown()
        kafka_rig.heal()
