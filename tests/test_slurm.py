"""A real single-node SLURM (munged, slurmctld, slurmd on this host; Debian's slurm-wlm and
munge, installed when missing): ``daskbelief train`` with a ``[cluster.slurm]`` section starts a
dask-jobqueue SLURMCluster whose Dask workers are SLURM jobs, trains the digits Downpour
pipeline on them and checks the accuracy; every job and daemon is stopped afterwards."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daskbelief.jobqueue import check
from daskbelief.testing.slurm import SingleNodeSlurm, ensure_installed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = ensure_installed()
    if why and os.environ.get("DASKBELIEF_REQUIRE_SLURM") == "1":
        pytest.fail(f"no SLURM here: {why} [DASKBELIEF_REQUIRE_SLURM=1: required here]")
    if why:
        pytest.skip(f"no SLURM here: {why}")
    with SingleNodeSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
    assert all(p.poll() is not None for p in cluster.procs.values())


def pipeline(tmp_path: Path, slurm_section: str) -> Path:
    """The digits Downpour pipeline, shorter, with the given [cluster.slurm] lines."""
    text = (ROOT / "pipelines" / "digits-downpour.toml").read_text()
    text = text.replace('path = "data/digits.zarr"', f'path = "{tmp_path / "digits.zarr"}"')
    text = text.replace("replicas = 4", "replicas = 2").replace("epochs = 30", "epochs = 15")
    path = tmp_path / "digits-slurm.toml"
    path.write_text(text + "\n[cluster.slurm]\n" + slurm_section)
    return path


def train(config: Path, out: Path, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daskbelief.cli", "train", str(config),
                           "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=240)


def test_digits_downpour_on_slurm_jobs_through_the_cli(slurm, tmp_path):
    logs = tmp_path / "job-logs"
    config = pipeline(tmp_path, f'jobs = 2\ncores = 1\nmemory = "1GB"\nwalltime = "00:10:00"\n'
                                f'log_directory = "{logs}"\ntimeout = 120\n')
    done = train(config, tmp_path / "run", slurm.env())
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n{slurm.logs()}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["test_accuracy"] > 0.9, summary
    assert summary["replicas"] == 2
    # The workers were SLURM jobs: each job's log shows its Dask worker joining the scheduler.
    job_logs = sorted(logs.glob("*.err"))
    assert len(job_logs) == 2, sorted(logs.iterdir())
    for log in job_logs:
        assert "Registered to" in log.read_text(), log.read_text()[-2000:]
    assert slurm.jobs() == []  # the run cancelled its jobs


def test_a_bad_slurm_key_is_one_line_before_any_work(tmp_path):
    config = pipeline(tmp_path, 'jobs = 2\ncores = 1\nmemory = "1GB"\nwaltime = "00:10:00"\n')
    done = train(config, tmp_path / "run", os.environ)
    assert done.returncode == 2
    assert "cluster.slurm.waltime" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "digits.zarr").exists()


@pytest.mark.parametrize("section, message", [
    ({}, "exactly one of slurm"),
    ({"slurm": {"cores": 1}}, "cluster.slurm.memory is required"),
    ({"slurm": {"cores": 1, "memory": "1GB", "jobs": 0}}, "cluster.slurm.jobs must be a positive"),
    ({"slurm": {"cores": 1, "memory": "1GB", "prcesses": 2}}, "unknown key cluster.slurm.prcesses"),
])
def test_cluster_section_errors_name_the_key(section, message):
    with pytest.raises(ValueError, match=message):
        check(section)
    assert check({"slurm": {"cores": 2, "memory": "2GB", "queue": "debug", "jobs": 3}}) == (
        "slurm", {"cores": 2, "memory": "2GB", "queue": "debug", "jobs": 3})


def test_job_scripts_export_the_worker_malloc_settings_before_the_sections_own_lines():
    from daskbelief.cluster import WORKER_MALLOC
    from daskbelief.jobqueue import job_options

    options = job_options({"cores": 2, "memory": "4GB", "job_script_prologue": ["module load x"]})
    assert options["processes"] == 2
    assert options["job_script_prologue"] == [*(f"export {k}={v}" for k, v in WORKER_MALLOC.items()),
                                              "module load x"]
    assert job_options({"cores": 4, "memory": "1GB", "processes": 1})["processes"] == 1
