"""Ray Data: write a dataset's rows as athomic messages, with ``ds.write_datasink``.

::

    from athomic.data import AthomicDatasink

    sink = AthomicDatasink(settings, topic="user.events.v1", key_column="user",
                           delay_column="delay_s", priority_column="priority")
    ds.write_datasink(sink)
    sink.written                # rows the brokers acknowledged

Each row becomes one message: by default the row without its control columns (topic,
delay, due time, priority, message id, headers; the key column stays in the message), or
the value of ``value_column``. Each write task publishes its rows through the connection's
ProducerActors with ``publish_batch``, with at most ``max_in_flight`` calls unacknowledged
(the handle's lane window bounds them too), so a fast dataset waits for the brokers rather
than piling up. Unlike ``ds.write_kafka``: delays, priorities, message ids, headers, the
payload pipeline and trace context; ``publish`` succeeds only once acknowledged.
"""

from __future__ import annotations

import collections
import datetime as dt
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import ray
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from ._handle import ProducerFactory, ProducerHandle
from .errors import AthomicError, ConfigurationError, PublishError
from .messages import MessagePriority, PublishingOutcome, validate_topic
from .pipeline import decode_record
from .settings import MessagingSettings

if TYPE_CHECKING:
    import pyarrow as pa  # type: ignore[import-untyped]
    from ray.data._internal.execution.interfaces import TaskContext
    from ray.data.datasource.datasink import WriteResult

__all__ = ["AthomicDatasink", "decode_row"]


@dataclass(frozen=True, slots=True)
class TaskResult:
    """What one write task returns to the driver: rows acknowledged per outcome, and the
    task's error when a row was not acknowledged (a failed task returns rather than raises,
    so the driver learns what every task wrote)."""

    outcomes: dict[PublishingOutcome, int]
    error: PublishError | None = None

    @property
    def rows(self) -> int:
        return sum(self.outcomes.values())


class AthomicDatasink(Datasink[TaskResult]):
    """A Ray Data sink publishing each row as a message: ``ds.write_datasink(sink)``.

    ``settings``: the connection's settings (its actors are started, or found, here on the
    driver, by ``ProducerFactory.create``), or a ``ProducerHandle`` to use. ``topic`` is the
    topic of every row, unless ``topic_column`` names one per row. Per row, columns may
    give the ``key``, ``delay_column`` (seconds, or a duration), ``deliver_at_column`` (a
    timestamp; one without a time zone is UTC, as in Ray Data), ``priority_column``
    (``"high"``, ``"normal"``, ``"low"``), ``message_id_column`` and ``headers_column`` (a
    map of str to bytes or str). A null in a control column means "not given" (no delay,
    NORMAL, an id athomic chooses). ``value_column``: publish that column's value instead of
    the row.

    ``batch_size`` rows go in one ``publish_batch`` call, at most ``max_in_flight`` calls
    per write task unacknowledged. Per key, rows keep their order within a batch; with
    ``max_in_flight > 1`` batches of a lane with several actors may interleave, and HIGH
    rows overtake others, as with ``publish``. ``min_rows_per_write``: Ray Data bundles
    blocks into write tasks of at least this many rows.

    After a write, ``written`` is the number of rows the brokers acknowledged and
    ``outcomes`` counts them per ``PublishingOutcome``. A write task whose row is not
    acknowledged (or is refused: a bad topic, delay or priority) sends nothing more, and the
    other tasks go on; then ``write_datasink`` raises ``PublishError`` saying how many rows
    of the dataset were acknowledged, chained to the first failed task's ``PublishError``,
    whose ``outcomes`` holds the outcome of each row that task reached (None: not
    acknowledged) and ``failures`` why. A write task Ray re-runs publishes its rows again:
    give rows a ``message_id`` to deduplicate (a delayed message with a caller-chosen id is
    delivered once).
    """

    def __init__(self, settings: MessagingSettings | ProducerHandle,
                 topic: str | None = None, topic_column: str | None = None,
                 key_column: str | None = None, delay_column: str | None = None,
                 deliver_at_column: str | None = None, priority_column: str | None = None,
                 message_id_column: str | None = None, headers_column: str | None = None,
                 *, value_column: str | None = None, batch_size: int = 1000,
                 max_in_flight: int = 4, min_rows_per_write: int | None = None) -> None:
        if topic is None and topic_column is None:
            raise ConfigurationError("AthomicDatasink needs a topic or a topic_column")
        if topic is not None:
            validate_topic(topic)
        if batch_size < 1 or max_in_flight < 1:
            raise ConfigurationError("batch_size and max_in_flight must be at least 1")
        self.topic = topic
        self.key_column = key_column
        self.value_column = value_column
        self.topic_column = topic_column
        self.delay_column = delay_column
        self.deliver_at_column = deliver_at_column
        self.priority_column = priority_column
        self.message_id_column = message_id_column
        self.headers_column = headers_column
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self._min_rows = min_rows_per_write
        self._control = frozenset(c for c in (topic_column, delay_column, deliver_at_column,
                                              priority_column, message_id_column,
                                              headers_column) if c is not None)
        self._named = {arg: column for arg, column in (
            ("topic_column", topic_column), ("key_column", key_column),
            ("value_column", value_column), ("delay_column", delay_column),
            ("deliver_at_column", deliver_at_column), ("priority_column", priority_column),
            ("message_id_column", message_id_column), ("headers_column", headers_column))
            if column is not None}
        self.handle = (settings if isinstance(settings, ProducerHandle)
                       else ProducerFactory.create(settings))
        self._low_lane = self.handle.settings.lanes.low > 0
        self.written = 0
        self.outcomes: dict[PublishingOutcome, int] = {}

    # --- Datasink ----------------------------------------------------------------------
    @property
    def min_rows_per_write(self) -> int | None:
        return self._min_rows

    def get_name(self) -> str:
        return "Athomic"

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        # The schema Ray passes is its first input's, before any map fused into the
        # write: the columns are checked in the write tasks instead.
        self.written = 0
        self.outcomes = {}

    def write(self, blocks: Iterable[Block], ctx: TaskContext) -> TaskResult:
        """Publish every row of this task's blocks. After a row fails nothing more is
        sent; the calls already in flight are still waited for and counted."""
        outcomes: list[PublishingOutcome | None] = []
        failures: dict[int, str] = {}
        pending: collections.deque[tuple[Any, list[int]]] = collections.deque()
        first: BaseException | None = None
        calls = 0
        try:
            for indices, items in self._calls(blocks, outcomes):
                pending.append((self._submit(items, indices), indices))
                calls += 1
                while len(pending) >= self.max_in_flight:
                    error = self._settle(*pending.popleft(), outcomes, failures)
                    first = first or error
                if first is not None:
                    break
        except Exception as exc:  # a row refused before it was sent
            if isinstance(exc, ConfigurationError) and not calls:
                raise  # a missing column, before anything was sent
            first = exc
        while pending:
            error = self._settle(*pending.popleft(), outcomes, failures)
            first = first or error
        done = dict(collections.Counter(o for o in outcomes if o is not None))
        if first is None and not failures:
            return TaskResult(done)
        if not failures:
            index = getattr(first, "index", None)
            if not isinstance(index, int):
                index = next((i for i, o in enumerate(outcomes) if o is None), len(outcomes))
            failures[index] = f"{type(first).__name__}: {first}"
        row = min(failures)
        return TaskResult(done, PublishError(
            f"write task {ctx.task_idx}: {sum(done.values()):,} of the {len(outcomes):,} "
            f"rows it reached were acknowledged; {len(failures):,} failed, first (row "
            f"{row}): {failures[row]}", topic=self.topic, failures=failures,
            outcomes=outcomes))

    def on_write_complete(self, write_result: WriteResult[TaskResult]) -> None:
        """Sums what the tasks wrote; raises PublishError if any of them failed."""
        results = [r for r in write_result.write_returns if r is not None]
        totals: collections.Counter[PublishingOutcome] = collections.Counter()
        for result in results:
            totals.update(result.outcomes)
        self.written = sum(totals.values())
        self.outcomes = dict(totals)
        errors = [r.error for r in results if r.error is not None]
        if errors:
            raise PublishError(
                f"{self.written:,} of {write_result.num_rows:,} rows were acknowledged; "
                f"{len(errors)} of {len(results)} write tasks failed, the first: "
                f"{errors[0]}", topic=self.topic) from errors[0]

    # --- rows -> publish calls -----------------------------------------------------------
    def _calls(self, blocks: Iterable[Block], outcomes: list[PublishingOutcome | None]
               ) -> Iterator[tuple[list[int], list[dict[str, Any]]]]:
        """The rows as publish arguments, ``batch_size`` rows at a time, one call per lane
        (a HIGH row must not wait behind NORMAL ones, and a batch the handle splits over
        lanes costs a merge task): per call, the rows' indices in this task and items."""
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            missing = {a: c for a, c in self._named.items() if c not in table.column_names}
            if missing:
                raise ConfigurationError(f"AthomicDatasink: no such column(s) {missing}; the "
                                         f"dataset has {table.column_names}")
            rows = table.to_pylist()
            for lo in range(0, len(rows), self.batch_size):
                base = len(outcomes)
                chunk = rows[lo:lo + self.batch_size]
                outcomes.extend([None] * len(chunk))
                lanes: dict[str, tuple[list[int], list[dict[str, Any]]]] = {}
                for i, row in enumerate(chunk, base):
                    try:
                        item = self._item(row)
                        lane = self._lane(item.get("priority"))
                    except AthomicError as exc:
                        raise exc.at_index(i) from None
                    indices, items = lanes.setdefault(lane, ([], []))
                    indices.append(i)
                    items.append(item)
                yield from lanes.values()

    def _lane(self, priority: Any) -> str:
        prio = MessagePriority.NORMAL if priority is None else MessagePriority.parse(priority)
        if prio is MessagePriority.HIGH:
            return "high"
        return "low" if prio is MessagePriority.LOW and self._low_lane else "normal"

    def _item(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.value_column is not None:
            message = row[self.value_column]
        else:
            message = {k: v for k, v in row.items() if k not in self._control}
        item: dict[str, Any] = {"message": message}
        for arg, column in (("key", self.key_column), ("topic", self.topic_column),
                            ("priority", self.priority_column),
                            ("message_id", self.message_id_column),
                            ("headers", self.headers_column)):
            if column is not None and not _null(value := row[column]):
                item[arg] = value
        if self.delay_column is not None and not _null(delay := row[self.delay_column]):
            item["delay_seconds"] = (delay.total_seconds() if isinstance(delay, dt.timedelta)
                                     else delay)
        if self.deliver_at_column is not None and not _null(
                when := row[self.deliver_at_column]):
            if isinstance(when, dt.datetime) and when.tzinfo is None:
                when = when.replace(tzinfo=dt.timezone.utc)
            item["deliver_at"] = when
        return item

    def _submit(self, items: list[dict[str, Any]], indices: list[int]) -> Any:
        defaults = {} if self.topic is None else {"topic": self.topic}
        try:
            return self.handle.publish_batch.remote(items, **defaults)
        except AthomicError as exc:  # refused before sending: name the task's row
            if exc.index is not None and exc.index < len(indices):
                exc.at_index(indices[exc.index], replace=True)
            raise

    @staticmethod
    def _settle(ref: Any, indices: list[int], outcomes: list[PublishingOutcome | None],
                failures: dict[int, str]) -> BaseException | None:
        """Wait for one call; fill in its rows' outcomes. Returns its error, if any."""
        try:
            for i, outcome in zip(indices, ray.get(ref), strict=True):
                outcomes[i] = outcome
            return None
        except Exception as exc:
            error = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
            if isinstance(error, PublishError) and error.outcomes is not None:
                for j, outcome in enumerate(error.outcomes):
                    outcomes[indices[j]] = outcome
                for j, why in error.failures.items():
                    failures[indices[j]] = why
            else:
                for i in indices:
                    failures[i] = f"{type(error).__name__}: {error}"
            return error if isinstance(error, BaseException) else exc


def _null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def decode_row(row: Mapping[str, Any], settings: MessagingSettings, *,
               model: type[Any] | None = None) -> Any:
    """Decode a row of ``ray.data.read_kafka`` (its ``topic``, ``key``, ``value`` and
    ``headers`` columns) back to what was published, as ``decode_record`` decodes a
    consumed record: an encrypted payload must be bound to the row's own topic and key."""
    record = SimpleNamespace(topic=row["topic"], key=row["key"], value=row["value"],
                             headers=row.get("headers") or ())
    return decode_record(record, settings, model=model)
