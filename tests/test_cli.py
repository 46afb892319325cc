"""The ``daskbelief`` command as a user runs it: real subprocesses, real clusters, real signals."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr

from daskbelief.data import open_store
from daskbelief.nn import Sequential
from daskbelief.ps import checkpoint

CONFIG = """
[dataset]
recipe = "digits"
path = "{data}"

[model]
input_shape = [64]
l2 = 1e-4
layers = [{{ type = "dense", units = {units}, activation = "relu" }}, {{ type = "dense", units = 10 }}]

[train]
algorithm = "downpour"
replicas = {replicas}
shards = 2
n_fetch = {n}
n_push = {n}
batch_size = 32
{length}
seed = 0
report_every = {report_every}
overlap = {overlap}
rule = {{ name = "adagrad", lr = 0.05 }}

[checkpoint]
every_seconds = {every}
"""


def config(tmp_path: Path, data: str, name: str = "run.toml", *, units=32, replicas=2, n=2,
           length="epochs = 8", report_every=10, overlap="true", every=1.0) -> Path:
    path = tmp_path / name
    path.write_text(CONFIG.format(data=data, units=units, replicas=replicas, n=n, length=length,
                                  report_every=report_every, overlap=overlap, every=every))
    return path


def cli(*args, timeout=180, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "daskbelief.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"daskbelief {args} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def last_json(done) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits_path):
    tmp = tmp_path_factory.mktemp("cli")
    done = cli("train", config(tmp, digits_path), "--local-workers", 2, "--out", tmp / "run")
    return tmp / "run", last_json(done)


def test_train_writes_a_complete_run_directory(finished_run):
    run_dir, summary = finished_run
    for key in ("test_accuracy", "test_loss", "seconds", "samples_per_second"):
        assert key in summary
    assert summary["test_accuracy"] >= 0.9
    for name in ("config.json", "summary.json", "model.json", "params.npy", "metrics.jsonl"):
        assert (run_dir / name).stat().st_size > 0
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {e["topic"] for e in events} >= {"daskbelief-replica", "daskbelief-run"}
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert ckpts and zarr.open_group(str(ckpts[-1]), mode="r").attrs["complete"]


def test_evaluate_predict_and_info(finished_run, digits_path, tmp_path):
    run_dir, summary = finished_run
    ev = last_json(cli("evaluate", run_dir, "--local-workers", 1))
    assert ev["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)
    out = tmp_path / "pred.zarr"
    pred = last_json(cli("predict", run_dir, "--out", out, "--local-workers", 2))
    assert pred["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)
    model = Sequential.from_dict(json.loads((run_dir / "model.json").read_text()))
    X, y = open_store(digits_path, "test").read()
    probs = zarr.open_group(str(out), mode="r")["predictions"][:]
    np.testing.assert_allclose(probs, model.predict(np.load(run_dir / "params.npy"), X), atol=1e-6)
    again = cli("predict", run_dir, "--out", out, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert last_json(cli("info", run_dir))["test_accuracy"] == summary["test_accuracy"]
    assert last_json(cli("info", digits_path))["train"]["n_classes"] == 10
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    info = last_json(cli("info", ckpt))
    assert info["complete"] and info["parameters"] == model.size


def test_a_model_parallel_run_leaves_its_model_in_its_checkpoint(tmp_path, digits_path):
    """A partitioned pipeline run writes no ``params.npy`` (no process held the model whole):
    its summary names the last checkpoint, which ``evaluate`` and ``predict`` read through the
    partition's blocks: the accuracy the run reported, the whole model's predictions."""
    path = config(tmp_path, digits_path, units=48, replicas=1, length="steps = 60")
    path.write_text(path.read_text().replace(
        "rule = {", 'partition = { kind = "horizontal", k = 2 }\nrule = {'))
    summary = last_json(cli("train", path, "--local-workers", 2, "--out", tmp_path / "run"))
    run_dir = tmp_path / "run"
    assert not (run_dir / "params.npy").exists()
    assert Path(summary["checkpoint"]).parent == run_dir / "checkpoints"
    ev = last_json(cli("evaluate", run_dir, "--local-workers", 2))
    assert ev["accuracy"] == summary["test_accuracy"]  # the same blocks' arithmetic
    pred = last_json(cli("predict", run_dir, "--out", tmp_path / "p.zarr", "--local-workers", 2))
    assert pred["accuracy"] == ev["accuracy"]
    model = Sequential.from_dict(json.loads((run_dir / "model.json").read_text()))
    X, _ = open_store(digits_path, "test").read()
    probs = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")["predictions"][:]
    whole = model.predict(checkpoint.load(summary["checkpoint"], arrays=False).params, X)
    np.testing.assert_allclose(probs, whole, rtol=0, atol=1e-5)


def test_datasets_build_with_recipe_options(tmp_path):
    out = last_json(cli("datasets", "build", "speech-frames", "--out", tmp_path / "s.zarr",
                        "--size", 600, "--option", "classes=5", "--chunk-rows", 100))
    store = open_store(out["store"])
    assert store.n_classes == 5 and store.chunk_rows == 100
    bad = cli("datasets", "build", "speech-frames", "--out", tmp_path / "t.zarr", "--option",
              "colour=red", check=False)
    assert bad.returncode == 2 and "colour" in bad.stderr and not (tmp_path / "t.zarr").exists()


def _bad_configs(tmp: Path, data: str) -> dict:
    good = config(tmp, data).read_text()
    cases = {
        "not valid TOML": "[dataset\nrecipe = 1",
        "unknown key train.replica ": good.replace("replicas = 2", "replica = 2"),
        "train.shards must be an integer": good.replace("shards = 2", 'shards = "two"'),
        "dataset.recipe 'mnist' is unknown": good.replace('recipe = "digits"', 'recipe = "mnist"'),
        "input size does not fit": good.replace("input_shape = [64]", "input_shape = [32]"),
        "unknown update rule 'adam'": good.replace('name = "adagrad"', 'name = "adam"'),
        "max_replicas must be": good.replace("replicas = 2", 'replicas = "auto"\nmax_replicas = 0'),
        "unknown key checkpoint.every_secs": good.replace("every_seconds", "every_secs"),
    }
    paths = {}
    for i, (message, text) in enumerate(cases.items()):
        paths[message] = tmp / f"bad{i}.toml"
        paths[message].write_text(text)
    return paths


def test_bad_configs_are_refused_before_anything_is_written(tmp_path, digits_path):
    for message, path in _bad_configs(tmp_path, digits_path).items():
        done = cli("train", path, "--out", tmp_path / "never", check=False)
        assert done.returncode == 2, (message, done.stderr)
        assert message.split(" (")[0].strip() in done.stderr.replace("\n", " "), (message, done.stderr)
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "never").exists()
    missing = cli("train", tmp_path / "nothere.toml", check=False)
    assert missing.returncode == 2 and "cannot read pipeline" in missing.stderr


def test_stores_and_run_directories_are_never_lost(finished_run, tmp_path, digits_path):
    run_dir, summary = finished_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    cfg = config(tmp_path, digits_path)
    refused = cli("train", cfg, "--out", run_dir, check=False)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    other = config(tmp_path, digits_path, "other.toml", units=16)
    wrong = cli("train", other, "--out", run_dir, "--resume", check=False)
    assert wrong.returncode == 2 and "different model" in wrong.stderr and "layer 0 differs" in wrong.stderr
    both = cli("train", cfg, "--out", run_dir, "--resume", "--overwrite", check=False)
    assert both.returncode == 2 and "choose one" in both.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # untouched
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    nothing = cli("train", cfg, "--out", tmp_path / "empty", "--resume", check=False)
    assert nothing.returncode == 2 and "nothing to resume" in nothing.stderr
    gone = cli("evaluate", run_dir, "--data", tmp_path / "missing.zarr", check=False)
    assert gone.returncode == 2 and "no dataset store" in gone.stderr
    half = tmp_path / "half.zarr"
    import daskbelief_datasets as recipes
    recipes.build("digits", half, size=100)
    zarr.open_group(str(half), mode="r+").attrs["complete"] = False
    incomplete = cli("evaluate", run_dir, "--data", half, check=False)
    assert incomplete.returncode == 2 and "incomplete" in incomplete.stderr


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _wait_for_event(run_dir: Path, proc, match, timeout: float = 120) -> None:
    """Until an event in the run's metrics.jsonl satisfies ``match``."""
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        if metrics.exists() and any(match(json.loads(line))
                                    for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError("training made no progress")


def train_and_stop(cfg: Path, run_dir: Path, workers: int, match, sig, code: int) -> None:
    """Run ``daskbelief train`` and send ``sig`` once an event satisfies ``match``: the command
    exits with ``code``, without a traceback, and leaves none of its processes running."""
    proc = subprocess.Popen([sys.executable, "-m", "daskbelief.cli", "train", str(cfg),
                             "--local-workers", str(workers), "--out", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_event(run_dir, proc, match)
        children = _children(proc.pid)
        assert children  # the local cluster's processes
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == code
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    gone = psutil.wait_procs(children, timeout=30)[1]
    assert not gone, f"left running: {gone}"


def exact_config(tmp_path: Path, data: str) -> Path:
    """R=1, n_fetch=n_push=1, no overlap: a deterministic run, long enough (a few seconds) for
    a signal sent after step 40 to land before training ends on a loaded machine."""
    return config(tmp_path, data, "exact.toml", replicas=1, n=1, length="steps = 1500",
                  report_every=5, overlap="false", every=1000.0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_path) -> np.ndarray:
    tmp = tmp_path_factory.mktemp("straight")
    cli("train", exact_config(tmp, digits_path), "--local-workers", 1, "--out", tmp / "run")
    return np.load(tmp / "run" / "params.npy")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_run_checkpoints_stops_cleanly_and_resumes_exactly(tmp_path, digits_path,
                                                                       uninterrupted, sig, code):
    """Interrupted + resumed == uninterrupted, bit for bit; nothing left running. Either signal
    stops the run the same way (one handler); the resume, which no longer depends on the signal,
    is run once, after SIGTERM, to keep the suite's time."""
    cfg = exact_config(tmp_path, digits_path)
    run_dir = tmp_path / "stopped"
    train_and_stop(cfg, run_dir, 1, lambda e: e["topic"] == "daskbelief-replica" and e["step"] >= 40,
                   sig, code)
    ckpt = last_json(cli("info", run_dir))["checkpoints"][-1]
    steps = last_json(cli("info", ckpt))["replica_steps"]["replica-0"]
    assert 40 <= steps < 1500  # stopped part-way, every step so far saved
    if sig != signal.SIGTERM:
        return
    resumed = last_json(cli("train", cfg, "--local-workers", 1, "--out", run_dir, "--resume"))
    assert resumed["resumed_from"] == ckpt
    np.testing.assert_array_equal(np.load(run_dir / "params.npy"), uninterrupted)


SANDBLASTER = """
[dataset]
recipe = "digits"
path = "{data}"

[model]
input_shape = [64]
l2 = 1e-3
layers = [{{ type = "dense", units = 16, activation = "tanh" }}, {{ type = "dense", units = 10 }}]

[train]
algorithm = "sandblaster"
iterations = {iterations}
tolerance = 0.0
portion_size = 100
seed = 0

[checkpoint]
every_seconds = 0.001
"""


def test_sandblaster_run_stopped_by_sigterm_resumes_to_the_reference(tmp_path, digits_path,
                                                                      finished_run):
    """SIGTERM mid-run: exit 143, a checkpoint of the L-BFGS state, nothing left running;
    ``--resume`` ends on the reference L-BFGS's iterate (1e-5 relative, as in
    test_sandblaster); a Downpour run's checkpoint is refused by a Sandblaster config."""
    from daskbelief.train.reference import train_lbfgs

    iterations = 15
    cfg = tmp_path / "lbfgs.toml"
    cfg.write_text(SANDBLASTER.format(data=digits_path, iterations=iterations))
    run_dir = tmp_path / "stopped"
    train_and_stop(cfg, run_dir, 2, lambda e: e.get("kind") == "iteration" and e["iteration"] >= 3,
                   signal.SIGTERM, 143)
    ckpt = last_json(cli("info", run_dir))["checkpoints"][-1]
    saved = last_json(cli("info", ckpt))
    assert saved["algorithm"] == "sandblaster" and 3 <= saved["lbfgs_iteration"] < iterations

    resumed = last_json(cli("train", cfg, "--local-workers", 2, "--out", run_dir, "--resume"))
    assert resumed["resumed_from"] == ckpt and resumed["iterations"] == iterations
    assert resumed["resumed_at"] == saved["lbfgs_iteration"]
    model = Sequential.from_dict(json.loads((run_dir / "model.json").read_text()))
    expect, _ = train_lbfgs(model, digits_path, iterations=iterations, portion_size=100, seed=0)
    got = np.load(run_dir / "params.npy")
    assert np.linalg.norm(got - expect) <= 1e-5 * np.linalg.norm(expect)

    downpour_run, _ = finished_run
    wrong = cli("train", cfg, "--out", downpour_run, "--resume", check=False)
    assert wrong.returncode == 2 and "written by downpour" in wrong.stderr


def test_only_the_known_interrupt_race_is_kept_off_stderr():
    """distributed 2026.8's sync() logs a NameError about 'future' when an interrupt lands as a
    call starts; that record is dropped, every other error still shows."""
    import logging

    from daskbelief.workarounds import InterruptRace

    def record(error):
        return logging.LogRecord("tornado.application", logging.ERROR, __file__, 1,
                                 "Exception in callback", None, (type(error), error, None))

    race = NameError("cannot access free variable 'future' where it is not associated with a "
                     "value in enclosing scope")
    assert not InterruptRace().filter(record(race))
    assert InterruptRace().filter(record(NameError("name 'x' is not defined")))
    assert InterruptRace().filter(record(RuntimeError("'future' failed")))


def test_only_a_lost_actors_cancelled_call_is_kept_off_stderr():
    """A call to a lost actor awaits the actor's Future, which the scheduler cancels: tornado's
    record of that (raised in distributed's ``wait_then_set_result``) is dropped, every other
    record of a cancellation still shows. So is the KeyError a worker answers (from
    ``actor_execute``) for an actor it no longer holds, and no other KeyError."""
    import logging
    import sys

    from distributed.client import FutureCancelledError

    from daskbelief.workarounds import LostActorCall

    def raised(where):
        def wait_then_set_result():
            raise FutureCancelledError("parameter-shard-0-x", "unknown")

        def elsewhere():
            raise FutureCancelledError("parameter-shard-0-x", "unknown")
        try:
            (wait_then_set_result if where == "actor" else elsewhere)()
        except FutureCancelledError:
            return logging.LogRecord("tornado.application", logging.ERROR, __file__, 1,
                                     "Exception in callback", None, sys.exc_info())

    assert not LostActorCall().filter(raised("actor"))
    assert LostActorCall().filter(raised("elsewhere"))

    def released(where):
        """The remote traceback of a call to an actor its worker no longer holds."""
        def actor_execute():
            raise KeyError("partition-block-0-x")

        def wait_then_set_result():
            (actor_execute if where == "worker" else lambda: {}["partition-block-0-x"])()
        try:
            wait_then_set_result()
        except KeyError:
            return logging.LogRecord("tornado.application", logging.ERROR, __file__, 1,
                                     "Exception in callback", None, sys.exc_info())

    assert not LostActorCall().filter(released("worker"))
    assert LostActorCall().filter(released("in the callback itself"))
    worker_side = released("worker")  # the worker logs the same error handling the call
    worker_side.name, worker_side.msg, worker_side.args = ("distributed.core",
                                                           "Exception while handling op %s",
                                                           ("actor_execute",))
    assert not LostActorCall().filter(worker_side)
    worker_side.args = ("gather",)
    assert LostActorCall().filter(worker_side)
    assert LostActorCall().filter(logging.LogRecord("tornado.application", logging.ERROR, __file__,
                                                    1, "something else", None, None))


def test_only_the_clients_records_of_a_lost_scheduler_are_kept_off_stderr():
    """The client's batched stream to a killed scheduler logs "Batched Comm Closed" with a
    traceback when a message was being sent at that moment (a race: CI met it once): that
    record is dropped, the same record of a worker's or the scheduler's own streams still shows."""
    import logging

    from distributed.comm.core import CommClosedError

    from daskbelief.workarounds import SchedulerGone

    def batched(link):
        error = CommClosedError("in <TCP (closed)>: Stream is closed")
        comm = f"<TCP (closed) {link} local=tcp://127.0.0.1:1 remote=tcp://127.0.0.1:2>"
        return logging.LogRecord("distributed.batched", logging.INFO, __file__, 1,
                                 "Batched Comm Closed %r", (comm,), (type(error), error, None))

    assert not SchedulerGone().filter(batched("Client->Scheduler"))
    assert SchedulerGone().filter(batched("Worker->Scheduler"))
    assert SchedulerGone().filter(batched("Scheduler->Worker"))
    assert not SchedulerGone().filter(logging.LogRecord(
        "distributed.client", logging.ERROR, __file__, 1, "Failed to reconnect to scheduler after"
        " 30.00 seconds, closing client", None, None))
    assert SchedulerGone().filter(logging.LogRecord("distributed.client", logging.ERROR, __file__,
                                                    1, "something else", None, None))
