"""Ray actors: ProducerActor (and, with delays, DelayBucketActor); topology applies Ray."""

from .producer import ProducerActor

__all__ = ["ProducerActor"]
