"""Faults the cluster chooses (issue 13): a worker drawn by a seed is SIGKILLed at a moment drawn
by the same seed, whatever it holds (a parameter shard, a replica, a model-parallel block, or
nothing), on three worker processes with no spare thread (as many replicas as threads) and with
spare ones. The seed and the victim's holdings are printed; the run must finish, account for
what the victim held with a recovery, and still learn (Downpour) or follow the reference
iterates (Sandblaster). Then the faults through the CLI on real `dask scheduler` / `dask worker`
processes: the driver SIGKILLed (its replicas stop within seconds) and the scheduler SIGKILLed
(one line on stderr, non-zero exit, no traceback).
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster
from threadpoolctl import threadpool_limits

from daskbelief import waits
from daskbelief.cli import METRICS_INCOMPLETE
from daskbelief.monitor import events
from daskbelief.nn import Dense, Sequential
from daskbelief.ps import checkpoint
from daskbelief.testing import chaos
from daskbelief.train.downpour import downpour
from daskbelief.train.errors import RunLost
from daskbelief.train.reference import train_lbfgs
from daskbelief.train.sandblaster import sandblaster
from daskbelief.workarounds import worker_info

pytestmark = pytest.mark.timeout(300)

# threads per worker and Downpour replicas, on three workers
LAYOUTS = {"no spare thread": (1, 3), "spare threads": (2, 2)}
DASKBELIEF = str(Path(sys.executable).with_name("daskbelief"))  # the console script
RUN_DEADLINE = 150.0  # seconds a run under chaos may take before it counts as hung


def test_the_choices_are_the_seeds_and_only_the_seeds():
    """Same seed, same victim and moments, whatever order the workers are listed in; over seeds
    every worker is hit (no role is spared); a kill every 4 s of a 13 s run is three kills."""
    workers = [f"tcp://127.0.0.1:{port}" for port in (40001, 39999, 41234)]
    assert chaos.choose_victim(chaos.draws(5)[0], workers) == chaos.choose_victim(
        chaos.draws(5)[0], workers[::-1])
    assert {chaos.choose_victim(chaos.draws(seed)[0], workers) for seed in range(30)} == set(workers)
    moments = chaos.choose_moments(chaos.draws(5)[1], 10, 20, 3)
    assert moments == sorted(moments) == chaos.choose_moments(chaos.draws(5)[1], 10, 20, 3)
    assert all(10 <= m <= 20 for m in moments)
    assert chaos.every(4, 13) == [4, 8, 12] and chaos.every(4, 12) == [4, 8]
    with pytest.raises(ValueError, match="no worker left"):
        chaos.choose_victim(chaos.draws(0)[0], [])


def three_workers(threads: int) -> LocalCluster:
    return LocalCluster(n_workers=3, threads_per_worker=threads, processes=True,
                        dashboard_address=":0")


def run_events(client, run: str, kind: str) -> list[dict]:
    return [m for _, m in client.get_events(events.RUN) if m.get("run") == run and m.get("kind") == kind]


def run_of(client, since: float) -> str:
    """The id of the run that started after ``since`` on this cluster."""
    starts = [m for _, m in client.get_events(events.RUN) if m.get("kind") == "start" and m["time"] >= since]
    assert len(starts) == 1, starts
    return starts[0]["run"]


def the_kill(killer: chaos.Chaos) -> chaos.Kill:
    assert killer.error is None, killer.error
    assert len(killer.kills) == 1, f"seed {killer.seed}: the run ended before the kill at {killer.missed}"
    return killer.kills[0]


def replicas_held(kill: chaos.Kill) -> list[int]:
    """The Downpour replicas whose task ran on the victim (keys ``RUN-replica-R-XXXXXX``)."""
    return [int(m.group(1)) for k in kill.held for m in [re.search(r"-replica-(\d+)-", k)] if m]


def assert_recovered_what_was_lost(kill: chaos.Kill, client, run: str, result) -> None:
    """Every kind of thing the victim held has its recovery: a shard recreated in place of the
    victim's, the blocks rebuilt off it, each of its replicas started again (a later attempt)."""
    recovered = run_events(client, run, "shard-recovered")
    assert result.summary["shard_recoveries"] == len(recovered), (result.summary, recovered)
    regained = sum(m["updates_regained"] for m in run_events(client, run, "shard-adopted"))
    assert result.summary["updates_lost"] == sum(m["updates_lost"] for m in recovered) - regained
    assert result.summary["updates_regained"] == regained
    if any(k.startswith("parameter-shard") for k in kill.held):
        assert any(m["lost_worker"] == kill.victim for m in recovered), (kill, recovered)
    if any(k.startswith("partition-block") for k in kill.held):
        rebuilt = run_events(client, run, "blocks-recovered")
        assert any(kill.victim in m["lost_workers"] for m in rebuilt), (kill, rebuilt)
    attempts = {o["replica"]: o["attempt"] for o in result.replica_outcomes}
    assert all(attempts[r] >= 1 for r in replicas_held(kill)), (kill, attempts)
    assert sorted(attempts) == list(range(result.summary["replicas"]))


def mlp():
    return Sequential((64,), [Dense(64, "relu"), Dense(10)], l2=1e-4)


MP = {"kind": "horizontal", "k": 2}


@pytest.mark.parametrize("layout, seed, partition, kills, extra", [
    pytest.param("no spare thread", 1, None, 1, {}, id="plain-no-spare-seed1"),
    pytest.param("no spare thread", 2, None, 2, {}, id="plain-no-spare-seed2-two-kills"),
    pytest.param("spare threads", 3, None, 1, {}, id="plain-spare-seed3"),
    pytest.param("spare threads", 4, None, 1,
                 {"warmstart_steps": 80, "eval_every": 0.2, "checkpoint_every": 0.3},
                 id="plain-spare-seed4-in-the-warm-start-checkpoints-evaluations"),
    pytest.param("no spare thread", 5, MP, 1, {}, id="model-parallel-no-spare-seed5"),
    pytest.param("spare threads", 6, MP, 1, {}, id="model-parallel-spare-seed6"),
])
def test_downpour_finishes_whatever_worker_is_lost_at_a_random_step(digits_path, tmp_path, layout,
                                                                     seed, partition, kills, extra):
    """``extra`` adds a warm start, checkpoints and evaluations for the kill to land in (seed 4
    draws a moment inside the warm start: only replica 0 steps, the others wait)."""
    threads, replicas = LAYOUTS[layout]
    steps = 200 if partition is None else 60
    if "checkpoint_every" in extra:
        extra = {**extra, "checkpoint_dir": tmp_path / "checkpoints"}
    _, moments = chaos.draws(seed)
    moments = chaos.choose_moments(moments, 10, steps // 3, kills)
    assert all(m < extra.get("warmstart_steps", steps) for m in moments)
    with three_workers(threads) as cluster, Client(cluster) as client:
        with chaos.Chaos(client, seed, moments, timeout=60) as killer:
            result = chaos.run_with_deadline(
                lambda: downpour(mlp(), digits_path, test=digits_path, client=client,
                                 replicas=replicas, shards=2 if partition is None else 1,
                                 n_fetch=5, n_push=5, rule={"name": "adagrad", "lr": 0.05},
                                 batch_size=32, steps=steps, report_every=5, seed=0,
                                 partition=partition, **extra),
                RUN_DEADLINE, f"Downpour under chaos (seed {seed}, {layout}, partition {partition})")
        run = run_of(client, killer.since)
        assert killer.error is None, killer.error
        assert len(killer.kills) == kills, f"seed {seed}: the run ended before the kills at {killer.missed}"
        alive = chaos.worker_pids(client).values()
        for kill in killer.kills:
            assert kill.pid not in alive  # it really died
            assert_recovered_what_was_lost(kill, client, run, result)
    assert np.isfinite(result.params).all()
    assert result.summary["test_accuracy"] >= (0.9 if partition is None else 0.8), (killer.kills,
                                                                                     result.summary)


def test_downpour_with_every_worker_lost_finishes_or_ends_cleanly(digits_path, tmp_path):
    """The named case of notes/chaos.md 22:35: two workers SIGKILLed at a random step, then,
    once every replica has moved to the last one, that one too (the nannies restart all three),
    so the replicas are rescheduled while no worker runs (distributed then leaves them in
    ``no-worker``). The run either finishes from its checkpoint or ends with RunLost naming it;
    it never hangs."""
    seed = 9
    _, moments = chaos.draws(seed)
    moment, = chaos.choose_moments(moments, 20, 60)
    with three_workers(1) as cluster, Client(cluster) as client:
        with chaos.Chaos(client, seed, [moment] * 2, timeout=60) as killer:
            last_kill = concurrent.futures.Future()

            def lose_the_last_worker():
                try:
                    waits.until(lambda: len(killer.kills) == 2, timeout=60, what="the first two kills")
                    killed = {k.victim for k in killer.kills}

                    def holding_every_replica():
                        live = [w for w in worker_info(client) if w not in killed]
                        return next((w for w in live if len(replicas_on(client, w)) == 3), None)
                    last = waits.until(holding_every_replica, timeout=30,
                                       what="every replica on the one worker left")
                    last_kill.set_result((last, chaos.kill_worker(client, last)))
                except Exception as e:  # noqa: BLE001 -- asserted below
                    last_kill.set_exception(e)

            finale = threading.Thread(target=lose_the_last_worker, daemon=True)
            finale.start()
            try:
                result = chaos.run_with_deadline(
                    lambda: downpour(mlp(), digits_path, test=digits_path, client=client, replicas=3,
                                     shards=2, n_fetch=5, n_push=5, rule={"name": "adagrad", "lr": 0.05},
                                     batch_size=32, steps=200, report_every=5, seed=0,
                                     checkpoint_dir=tmp_path / "checkpoints", checkpoint_every=0.3),
                    60, f"Downpour with every worker lost (seed {seed})")
            except RunLost as e:
                assert e.checkpoint is None or checkpoint.is_checkpoint(e.checkpoint), e
                result = None
            finally:
                finale.join(timeout=60)
        assert killer.error is None and len(killer.kills) == 2, (killer.error, killer.kills)
        print("the last worker killed:", last_kill.result(timeout=1))
    if result is not None:
        assert result.summary["test_accuracy"] >= 0.9, result.summary


def replicas_on(client, address: str) -> list[str]:
    return [k for k in map(str, client.processing([address]).get(address, ())) if "-replica-" in k]


def mlp_lbfgs():
    return Sequential((64,), [Dense(16, "tanh"), Dense(10)], l2=1e-3)


@pytest.mark.parametrize("layout, seed, partition", [
    pytest.param("no spare thread", 7, None, id="plain-no-spare-seed7"),
    pytest.param("spare threads", 8, None, id="plain-spare-seed8-evaluations"),
    pytest.param("no spare thread", 11, MP, id="model-parallel-no-spare-seed11"),
    pytest.param("spare threads", 12, MP, id="model-parallel-spare-seed12")])
def test_sandblaster_finishes_whatever_worker_is_lost_at_a_random_iteration(digits_path, layout, seed,
                                                                            partition):
    """A lost shard holder is restored and its iterations replayed; a lost portion worker only
    loses portions; a lost block's model-parallel replicas are made anew and the evaluation
    starts again: either way the iterates are the reference's (model-parallel: to 1e-4, a
    partitioned pass adds in another float32 order). With spare threads, plain, a test
    evaluation (a task reading the iterate from the shards) follows every iteration, so the
    kill lands among portions and evaluations."""
    threads, _ = LAYOUTS[layout]
    rel = 1e-5 if partition is None else 1e-4
    evaluations = ({"test": digits_path, "eval_every": 1e-3}
                   if layout == "spare threads" and partition is None else {})
    iterations, portion = 10, 100
    _, moments = chaos.draws(seed)
    with three_workers(threads) as cluster, Client(cluster) as client:
        with chaos.Chaos(client, seed, chaos.choose_moments(moments, 1, 6), chaos.iterations,
                         timeout=60) as killer:
            result = chaos.run_with_deadline(
                lambda: sandblaster(mlp_lbfgs(), digits_path, client=client, shards=2,
                                    iterations=iterations, portion_size=portion, tolerance=0.0,
                                    partition=partition, **evaluations),
                RUN_DEADLINE, f"Sandblaster under chaos (seed {seed}, {layout})")
        kill = the_kill(killer)
        recoveries = run_events(client, result.summary["run"], "recovery")
        rebuilt = run_events(client, result.summary["run"], "blocks-recovered")
    if any(k.startswith("parameter-shard") for k in kill.held):
        assert len(recoveries) == 1 and kill.victim in recoveries[0]["lost"], (kill, recoveries)
    elif any(k.startswith("partition-block") for k in kill.held):
        assert rebuilt and kill.victim in rebuilt[0]["lost_workers"], (kill, rebuilt)
    with threadpool_limits(1):
        params, ref = train_lbfgs(mlp_lbfgs(), digits_path, iterations=iterations,
                                  portion_size=portion, seed=0)
    if evaluations:  # one after every iteration (those replayed too), and the final one
        assert sum(h["test_loss"] is not None for h in result.history) > iterations, result.history
    ours = [h["loss"] for h in result.history if h["loss"] is not None]
    assert ours == pytest.approx([h["loss"] for h in ref.history], rel=rel), kill
    assert np.linalg.norm(result.params - params) <= rel * np.linalg.norm(params)


# -- through the CLI, on real `dask scheduler` and `dask worker` processes ------------------------

PIPELINE = """
[dataset]
recipe = "digits"
path = "{data}"

[model]
input_shape = [64]
loss = "softmax_cross_entropy"
layers = [{{ type = "dense", units = 64, activation = "relu" }}, {{ type = "dense", units = 10 }}]

[train]
{train}
eval_every = 1.0

[checkpoint]
every_seconds = 1.0
"""
TRAIN = {"downpour": 'algorithm = "downpour"\nreplicas = 2\nshards = 2\nbatch_size = 32\n'
                     'epochs = 400\nrule = { name = "adagrad", lr = 0.05 }',
         "sandblaster": 'algorithm = "sandblaster"\nshards = 2\niterations = 100000\n'
                        'tolerance = 0.0'}


@pytest.fixture
def real_cluster(tmp_path):
    """A `dask scheduler` and two `dask worker` processes (nannies, one thread each)."""
    with chaos.dask_scheduler(tmp_path / "cluster") as (scheduler, file), \
            chaos.dask_workers(file, 2, nthreads=1):
        yield scheduler, file


def start_training(tmp_path, digits_path, scheduler_file, algorithm: str = "downpour",
                   env: dict | None = None) -> tuple[subprocess.Popen, object]:
    config = tmp_path / "chaos.toml"
    config.write_text(PIPELINE.format(data=digits_path, train=TRAIN[algorithm]))
    run_dir = tmp_path / "run"
    cli = subprocess.Popen([DASKBELIEF, "train", str(config),
                            "--scheduler-file", str(scheduler_file), "--out", str(run_dir)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=None if env is None else {**os.environ, **env})
    return cli, run_dir


def training_under_way(cli, run_dir):
    """True once a checkpoint is complete (so the replicas are running)."""
    chaos.running(cli, "daskbelief train")
    return checkpoint.latest(run_dir / "checkpoints") is not None


def stderr_after(cli, run_dir, fault) -> str:
    """What `daskbelief train` wrote on stderr once ``fault()`` struck under way (after its first
    checkpoint) and the process ended; it is killed should it outlive the deadline (a hang)."""
    try:
        waits.until(lambda: training_under_way(cli, run_dir), timeout=120,
                    what="the first checkpoint of `daskbelief train`")
        fault()
        _, stderr = cli.communicate(timeout=120)  # a hang, not a deadline for speed
    finally:
        if cli.poll() is None:
            chaos.sigkill(cli.pid)
            cli.communicate(timeout=30)
    print(stderr)
    return stderr


def test_a_driver_killed_leaves_no_replica_running(tmp_path, digits_path, real_cluster):
    """The replicas stop once the lease the driver renews has gone unrenewed for the timeout
    it wrote into it (its ``daskbelief.lease-timeout``, 3 s here)."""
    _, file = real_cluster
    with Client(scheduler_file=str(file)) as client:
        cli, run_dir = start_training(tmp_path, digits_path, file,
                                      env={"DASK_DASKBELIEF__LEASE_TIMEOUT": "3"})
        try:
            waits.until(lambda: training_under_way(cli, run_dir), timeout=120,
                        what="the first checkpoint of `daskbelief train`")
            replicas = sum(chaos.threads_in(client, "run_replica").values())
        finally:
            chaos.sigkill(cli.pid)
            cli.communicate(timeout=30)
        assert replicas == 2
        waits.until(lambda: not any(chaos.threads_in(client, "run_replica").values()),
                    timeout=30, every=0.5, what="every worker to stop the dead driver's replicas")


@pytest.mark.parametrize("algorithm", ["downpour", "sandblaster"])
def test_a_scheduler_killed_ends_the_run_with_one_line_that_says_how_to_resume(tmp_path, digits_path,
                                                                                real_cluster, algorithm):
    """Within seconds (no call waits out distributed's connect timeout), one line on stderr.
    Should the run have finished training when the kill lands (Sandblaster's line search can end
    it then), its outputs are complete, and a line says the metrics may lack the last events."""
    scheduler, file = real_cluster
    cli, run_dir = start_training(tmp_path, digits_path, file, algorithm)
    stderr = stderr_after(cli, run_dir, lambda: chaos.sigkill(scheduler.pid))
    ours = stderr.splitlines()
    if cli.returncode == 0:
        summary = json.loads((run_dir / "summary.json").read_text())
        expect = [] if summary["metrics_complete"] else [f"daskbelief train: {METRICS_INCOMPLETE}"]
        assert ours == expect, stderr
        assert summary["run_dir"] == str(run_dir) and (run_dir / "model.json").exists()
        return
    assert cli.returncode == 3
    last = checkpoint.latest(run_dir / "checkpoints")
    assert last is not None and checkpoint.is_checkpoint(last)
    assert len(ours) == 1, stderr  # nothing of distributed's: no ERROR record, no traceback
    assert "Traceback" not in stderr and "ERROR" not in stderr
    assert ours[0].startswith("daskbelief train: lost the scheduler at tcp://"), ours
    assert f"last complete checkpoint: {last};" in ours[0], ours
    assert f"--out {run_dir} --resume" in ours[0] and f"--scheduler-file {file}" in ours[0], ours
    json.dumps(checkpoint.describe(last))  # the run directory is intact: its checkpoint reads


def test_closing_the_event_log_without_a_scheduler_tells_a_finished_run_apart(tmp_path):
    """``pipeline._close_log`` with the scheduler killed: after a run that finished training
    its log's close gives up (False: the last events may be missing), before one it raises,
    and a run reported lost (``RunLost``) is left to say so itself."""
    from daskbelief.monitor.events import EventLog
    from daskbelief.pipeline import _close_log

    with chaos.dask_scheduler(tmp_path / "cluster") as (scheduler, file), \
            Client(scheduler_file=str(file)) as client:
        logs = [EventLog(client, path=tmp_path / f"metrics-{i}.jsonl") for i in range(3)]
        chaos.sigkill(scheduler.pid)
        waits.until(lambda: client.status != "running", timeout=30, every=0.1,
                    what="the client to notice its scheduler is gone")
        assert _close_log(logs[0], client, trained=True, lost=None) is False
        assert _close_log(logs[1], client, trained=False, lost=RunLost("the scheduler", None)) is False
        with pytest.raises(ConnectionError, match="lost its scheduler"):
            _close_log(logs[2], client, trained=False, lost=None)


def test_every_worker_lost_for_good_ends_the_run_with_one_line_that_says_how_to_resume(tmp_path,
                                                                                   digits_path):
    """Every worker SIGKILLed with its nanny (each `dask worker` session), so none comes back:
    once ``daskbelief.recovery-timeout`` (1 s here) has passed, exit 3 and one line naming what
    was lost, the last complete checkpoint and the command that resumes; no traceback."""
    with chaos.dask_scheduler(tmp_path / "cluster") as (_, file), \
            chaos.dask_workers(file, 2, nthreads=1) as nannies:
        cli, run_dir = start_training(tmp_path, digits_path, file,
                                      env={"DASK_DASKBELIEF__RECOVERY_TIMEOUT": "1"})
        stderr = stderr_after(cli, run_dir, lambda: [os.killpg(n.pid, signal.SIGKILL) for n in nannies])
    assert cli.returncode == 3, stderr
    last = checkpoint.latest(run_dir / "checkpoints")
    assert last is not None and checkpoint.is_checkpoint(last)
    assert "Traceback" not in stderr
    line = stderr.splitlines()[-1]
    assert line.startswith("daskbelief train: lost every worker; "), line
    assert f"last complete checkpoint: {last};" in line and f"--out {run_dir} --resume" in line, line
