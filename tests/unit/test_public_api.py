"""The public surface: the names DESIGN.md promises, and nothing accidental."""

from __future__ import annotations

import inspect

import athomic
from athomic import errors


def test_contract_names_are_exported() -> None:
    for name in ["MessagingSettings", "ProducerFactory", "MessagePriority",
                 "PublishingOutcome", "MessageHeaders", "PublishError",
                 "MessagingConnectionError", "decode_message", "AthomicError",
                 "DirectPublishStrategy", "DelayedPublishStrategy", "ProducerHandle",
                 "decode_record", "extract_context", "message_context"]:
        assert name in athomic.__all__, name
        assert getattr(athomic, name) is not None


def test_all_is_exactly_the_public_names() -> None:
    public = {n for n in vars(athomic) if not n.startswith("_")}
    modules = {n for n, v in vars(athomic).items() if inspect.ismodule(v)}
    assert set(athomic.__all__) == public - modules
    assert len(athomic.__all__) == len(set(athomic.__all__))


def test_every_error_is_an_athomic_error_with_a_raised_when_docstring() -> None:
    classes = [v for v in vars(errors).values()
               if inspect.isclass(v) and issubclass(v, BaseException)
               and v.__module__ == errors.__name__]
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, errors.AthomicError), cls
        assert (cls.__doc__ or "").startswith(("Raised when", "Root of")), cls


def test_errors_survive_pickling_with_their_data() -> None:
    import pickle

    e = errors.RecordTooLargeError("too big", size=10, limit=5, index=2)
    e2 = pickle.loads(pickle.dumps(e))
    assert (type(e2), e2.size, e2.limit, e2.index, str(e2)) == (
        errors.RecordTooLargeError, 10, 5, 2, str(e))
    p = errors.PublishError("x", topic="t", failures={1: "boom"}, outcomes=["a", None])
    p2 = pickle.loads(pickle.dumps(p))
    assert (p2.topic, p2.failures, p2.outcomes) == ("t", {1: "boom"}, ["a", None])


def test_version_comes_from_one_place_and_the_license_matches() -> None:
    import sys
    from importlib.metadata import metadata, version
    from pathlib import Path

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert athomic.__version__ == version("athomic-ray") == project["version"]
    assert project["license"] == "Apache-2.0"
    text = (root / "LICENSE").read_text()
    assert text.startswith("Apache License") and "Version 2.0, January 2004" in text
    assert metadata("athomic-ray")["License-Expression"] == "Apache-2.0"
