"""Training events through Dask's structured event log.

Replicas and coordinators call ``emit`` wherever they run; the scheduler keeps the events per topic,
so the dashboard page reads them on the scheduler and the driver subscribes to them with
``EventLog`` (which also appends them to a run's ``metrics.jsonl``).

Every event is a flat dict with ``run`` (the run's id) and ``time`` (absolute, ``time.time()``);
durations since the run started are called ``elapsed``. The fields per topic:

* ``daskbelief-replica`` (Downpour, every ``report_every`` steps of a replica): ``replica``,
  ``worker``, ``step``, ``batch_size``, ``loss`` (mean over the steps since the last report),
  ``samples_per_s``, ``staleness`` (mean versions missed by its recent pushes).
* ``daskbelief-shard`` (the driver, about once a second): the shard's ``stats()``: ``shard``,
  ``start``, ``stop``, ``version``, ``applied``, ``rejected``, ``fetches``, ``bytes_in``,
  ``bytes_out``, ``uptime``, ``staleness_mean``, ``staleness_hist`` (a list of counts, bin i =
  staleness i, the last bin "or more"), ``params_finite``.
* ``daskbelief-run`` (the driver / coordinator): ``kind`` is one of
  ``start`` (``algorithm`` and its settings), ``eval`` (``elapsed``, ``test_loss``,
  ``test_accuracy``), ``iteration`` (Sandblaster: ``iteration``, ``loss``, ``grad_norm``,
  ``evaluations``, ``elapsed``), ``checkpoint`` (``path``, ``seconds``: how long writing it
  took), ``checkpoint-failed`` (``error``), ``shard-recovered`` (``shard``, ``updates_lost``),
  ``shard-adopted`` (``shard``, ``updates_regained``: a recreated shard took a replica's newer
  copy of its slice), ``replica-restarted`` (``replica``),
  ``end`` (the summary figures).
* ``daskbelief-portion`` (Sandblaster, one per finished portion task): ``evaluation``,
  ``portion``, ``worker``, ``seconds`` (compute time), ``backup`` (this copy was a backup),
  ``counted`` (this copy's result was the one applied); and one per backup launch with
  ``kind="backup-launched"`` and ``portion``.
"""
from __future__ import annotations

import json
import threading
import time
import uuid

from distributed import get_client, get_worker

REPLICA = "daskbelief-replica"  # a replica's progress: step, loss, samples/s, staleness
SHARD = "daskbelief-shard"      # a parameter shard's counters
RUN = "daskbelief-run"          # run start/end and test metrics
PORTION = "daskbelief-portion"  # Sandblaster: portions done per worker, backups launched
TOPICS = (REPLICA, SHARD, RUN, PORTION)


def emit(topic: str, **fields) -> None:
    """Log one event (a flat dict of msgpack-able values) from a worker or the driver."""
    fields.setdefault("time", time.time())
    try:
        get_worker().log_event(topic, fields)
    except ValueError:
        client = get_client()
        if client.status == "running":  # else no scheduler takes it: the call would wait out
            client.log_event(topic, fields)  # the connect timeout, and the run is lost anyway


class EventLog:
    """Collects daskbelief events on the driver as they arrive, optionally into a JSON-lines file
    and to ``listeners`` (callables taking each record, e.g. a progress bar)."""

    def __init__(self, client, path=None, topics=TOPICS, listeners=(), timeout: float = 30.0):
        self.client, self.topics, self.listeners = client, topics, list(listeners)
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8") if path else None
        for topic in topics:
            client.subscribe_topic(topic, self._handler(topic))
        self._probe, self._echo = f"daskbelief-eventlog-{uuid.uuid4().hex[:12]}", threading.Event()
        client.subscribe_topic(self._probe, lambda event: self._echo.set())
        self._round_trip(timeout)

    def _round_trip(self, timeout: float) -> None:
        """Return once an event sent now has come back through the scheduler.

        Subscriptions and deliveries travel on the client's batched stream, in order, but
        ``log_event`` is a separate call that can overtake them. An echo on a probe topic
        (subscribed after the others) therefore proves that the subscriptions are in place, and,
        sent at ``close``, that every event logged before it has been delivered here.
        """
        self._echo.clear()
        deadline = time.time() + timeout
        while not self._echo.wait(0.05):
            if self.client.status != "running":  # the scheduler is gone: nothing comes back
                raise ConnectionError(f"the client lost its scheduler ({self.client.status})")
            if time.time() > deadline:
                raise TimeoutError(f"the scheduler did not echo an event in {timeout:.0f}s")
            self.client.log_event(self._probe, {"probe": True})

    def _handler(self, topic):
        def handle(event):
            _, msg = event
            record = {"topic": topic, **msg}
            with self._lock:
                self.events.append(record)
                if self._file:
                    self._file.write(json.dumps(record) + "\n")
                    self._file.flush()
                for listener in self.listeners:
                    listener(record)
        return handle

    def of(self, topic: str) -> list[dict]:
        """The events of one topic received so far."""
        with self._lock:
            return [e for e in self.events if e["topic"] == topic]

    def close(self, timeout: float = 30.0) -> None:
        """Take in what is still on its way, stop listening and close the metrics file."""
        try:
            self._round_trip(timeout)
        finally:
            for topic in (*self.topics, self._probe):
                self.client.unsubscribe_topic(topic)
            if self._file:
                self._file.close()
                self._file = None
