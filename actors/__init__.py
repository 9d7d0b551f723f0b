"""Ray actors: ProducerActor, StageActor (and, with delays, DelayBucketActor); topology
applies Ray."""

from .producer import ProducerActor
from .stage import StageActor, StagePool

__all__ = ["ProducerActor", "StageActor", "StagePool"]
