"""Loss and accuracy of a model over a whole store, in parallel over its data shards."""
from __future__ import annotations

import numpy as np

from daskbelief import waits
from daskbelief.backend import namespace, to_numpy
from daskbelief.cluster import client_or_local, require_workers
from daskbelief.data import open_store
from daskbelief.monitor import events
from daskbelief.train.partitioned import Blocks

EVALUATION_TIMEOUT = 3600.0  # seconds a whole-store evaluation may take on the cluster


def output_metrics(task: str, outputs, y) -> dict:
    """Summed loss (and correct count for classification) of predictions ``outputs`` against ``y``.

    Sums, not means, so that per-shard results add up exactly; ``finish`` turns them into means.
    """
    xp = namespace(outputs)
    if task == "classification":
        y = xp.asarray(y).astype(np.int64)
        picked = outputs[xp.arange(len(y)), y]
        loss = -xp.log(xp.maximum(picked, np.finfo(np.float32).tiny)).sum()
        correct = (outputs.argmax(axis=1) == y).sum()
        return {"loss_sum": float(loss), "correct": int(correct), "n": len(y)}
    diff = outputs - xp.asarray(y).reshape(outputs.shape)
    return {"loss_sum": float(0.5 * (diff * diff).sum()), "correct": 0, "n": len(y)}


def finish(parts: list[dict], task: str) -> dict:
    """Mean loss and accuracy from per-shard sums."""
    n = sum(p["n"] for p in parts)
    out = {"loss": sum(p["loss_sum"] for p in parts) / n, "n": n}
    if task == "classification":
        out["accuracy"] = sum(p["correct"] for p in parts) / n
    return out


def evaluate_rows(model, params, store, start: int, stop: int, block: int = 4096) -> dict:
    """Summed metrics over rows ``[start, stop)`` of ``store``, read a block at a time."""
    return predicted_rows(lambda X: model.predict(params, X), store, start, stop, block)


def predicted_rows(predict, store, start: int, stop: int, block: int = 4096) -> dict:
    """Summed metrics of ``predict(X)`` over rows ``[start, stop)`` of ``store``, read a block
    at a time."""
    parts = []
    for lo in range(start, stop, block):
        X, y = store.read(lo, min(lo + block, stop))
        parts.append(output_metrics(store.task, predict(X), y))
    return {k: sum(p[k] for p in parts) for k in ("loss_sum", "correct", "n")}


class BlockEvaluator:
    """Test evaluations of a model-parallel run without the model in any one process: its own
    set of blocks (started at the first evaluation), loaded from the parameter server before
    each evaluation, the test rows passing through them forward only."""

    def __init__(self, client, plan):
        self.client, self.plan, self.blocks = client, plan, None

    def __call__(self, ps, store, rows: int) -> dict:
        """Mean loss (and accuracy) over the first ``rows`` rows of ``store`` at the parameters
        the server ``ps`` holds now. A failure (a block's or shard's worker lost) closes the
        blocks: the next evaluation starts new ones."""
        try:
            if self.blocks is None:
                self.blocks = Blocks.start(self.client, self.plan, None, ps=ps)
            else:
                n = self.plan.n_blocks
                self.blocks.call("set_server", [(ps,)] * n)
                self.blocks.call("fetch", [()] * n)
            return finish([predicted_rows(self.blocks.predict, store, 0, min(rows, store.n))],
                          store.task)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self.blocks is not None:
            self.blocks.close()
            self.blocks = None


def test_row(elapsed: float, step, metrics: dict) -> dict:
    """The history row of a test evaluation (``metrics`` as ``finish`` returns them)."""
    return {"time": elapsed, "step": step, "replica": None, "loss": None,
            "test_loss": metrics["loss"], "test_accuracy": metrics.get("accuracy")}


def announce_test(run: str, row: dict) -> None:
    """Publish a test evaluation's row as the run's "eval" event (dashboard, metrics.jsonl)."""
    events.emit(events.RUN, run=run, kind="eval", elapsed=row["time"],
                test_loss=row["test_loss"], test_accuracy=row["test_accuracy"])


def evaluate(model, params, data, *, split: str = "test", client=None, n_parts: int | None = None,
             normaliser=None, plan=None) -> dict:
    """Mean loss (and accuracy) of ``model`` at ``params`` over a store, one task per data shard.

    ``data`` is a ``DataStore`` or a store URL (``split`` picks train or test). The parameters are
    scattered once to every worker rather than shipped with each task. ``normaliser``: the
    standardisation the model was trained with (``TrainResult.normaliser``), when the store's
    own differs (a store of new raw features); default: the store's. ``plan``: evaluate
    through that partition's blocks instead, each making or reading its own ranges of
    ``params`` (a ``sources.Ranged``, e.g. a checkpoint: no process holds the model), the rows
    read here a block at a time.
    """
    store = open_store(data, split=split) if isinstance(data, str) else data
    if normaliser is not None:
        store = store.with_normaliser(normaliser)
    model.check_data(store.feature_shape, store.n_classes)
    with client_or_local(client) as c:
        if plan is not None:
            blocks = Blocks.start(c, plan, params)
            try:
                return finish([predicted_rows(blocks.predict, store, 0, store.n)], store.task)
            finally:
                blocks.close()
        workers = require_workers(c)
        k = min(n_parts or len(workers), store.n_chunks)
        shared = c.scatter(to_numpy(params), broadcast=True, hash=False)
        futures = [c.submit(evaluate_rows, model, shared, store, a, b, pure=False)
                   for a, b in store.row_ranges(k)]
        parts = waits.results(futures, timeout=EVALUATION_TIMEOUT,
                              what=f"the evaluation of {store.url} ({k} parts)")
    return finish(parts, store.task)
