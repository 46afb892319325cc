"""A real single-node SLURM for tests: munged, slurmctld and slurmd on this host.

Debian's ``slurm-wlm`` and ``munge`` packages (installed by ``ensure_installed`` when missing,
as ``.ci/run`` does for Chromium). Everything the daemons write lives in one directory of the
caller's: the munge key and socket, ``slurm.conf``, spool and state directories, pid and log
files; the daemons run in the foreground as child processes of this one and are stopped by
their process ids. In a container without cgroups: ``ProctrackType=proctrack/linuxproc`` and
``TaskPlugin=task/none``. SLURM's own commands (``sbatch``, ``squeue``, ``scancel``, which
dask-jobqueue calls) find this cluster through ``SLURM_CONF``, which ``SingleNodeSlurm`` sets in
this process's environment while it runs.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psutil

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
START_TIMEOUT = 60.0  # seconds for the node to come up idle


def missing_programs() -> list[str]:
    """The daemons and commands this harness needs that are not on this host."""
    needed = (*DAEMONS, "munge", "sbatch", "squeue", "scancel", "sinfo")
    return [p for p in needed
            if shutil.which(p) is None and not os.access(Path("/usr/sbin", p), os.X_OK)]


def ensure_installed() -> str | None:
    """Install the Debian packages when a program is missing; None when everything is there,
    else the reason it cannot be (no apt-get, not root, the install failed)."""
    if not missing_programs():
        return None
    if shutil.which("apt-get") is None:
        return f"{', '.join(missing_programs())} missing and no apt-get to install {PACKAGES}"
    if os.geteuid() != 0:
        return f"{', '.join(missing_programs())} missing and installing {PACKAGES} needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            return f"{' '.join(cmd)} failed: {done.stderr.strip()[-300:]}"
    missing = missing_programs()
    return f"still missing after installing {PACKAGES}: {', '.join(missing)}" if missing else None


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def slurm_conf(root: Path, node: str, cpus: int, memory_mb: int, ports: list[int]) -> str:
    """A ``slurm.conf`` for one node that is also the controller, all paths under ``root``."""
    return "\n".join([
        "ClusterName=daskbelief-test", f"SlurmctldHost={node}(127.0.0.1)",
        "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={ports[0]}", f"SlurmdPort={ports[1]}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={root}/munge/socket",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill", "MpiDefault=none", "ReturnToService=2",
        "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        "SlurmctldDebug=info", "SlurmdDebug=info",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP", ""])


class SingleNodeSlurm:
    """munged + slurmctld + slurmd on this host, under ``root``; a context manager.

    ``start`` returns once ``sinfo`` shows the node idle (or raises, with the daemons' logs);
    ``stop`` ends every job, then the daemons (by process id: terminate, then kill), and
    restores ``SLURM_CONF``.
    """

    def __init__(self, root, cpus: int | None = None, memory_mb: int | None = None):
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb or max(256, psutil.virtual_memory().total // 2**20 // 2)
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self._previous_conf = os.environ.get("SLURM_CONF")

    def __enter__(self) -> SingleNodeSlurm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        munge = self.root / "munge"
        for d in (munge, self.root / "state", self.root / "spool"):
            d.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)
        munge.chmod(0o711)  # the socket's directory: reachable by job processes of any user
        key = munge / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        self.conf.write_text(slurm_conf(self.root, self.node, self.cpus, self.memory_mb,
                                        _free_ports(2)))
        os.environ["SLURM_CONF"] = str(self.conf)
        self._spawn("munged", [_program("munged"), "-F", "--force", f"--key-file={key}",
                               f"--socket={munge}/socket", f"--pid-file={munge}/munged.pid",
                               f"--log-file={munge}/munged.log", f"--seed-file={munge}/seed"])
        self._wait(lambda: (munge / "socket").exists(), "munged's socket")
        self._spawn("slurmctld", [_program("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_program("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(self._node_idle, f"node {self.node} idle in sinfo")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env(), start_new_session=True)
        log.close()

    def _node_idle(self) -> bool:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env(),
                              capture_output=True, text=True, timeout=20)
        return done.returncode == 0 and done.stdout.strip().startswith("idle")

    def _wait(self, ready, what: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not within {timeout:.0f}s"
                raise RuntimeError(f"SLURM on {self.node}: waited for {what}: {why}\n"
                                   + self.logs())
            time.sleep(0.25)

    def logs(self, tail: int = 2000) -> str:
        """The last characters of each daemon's log, for failure messages."""
        out = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def jobs(self) -> list[str]:
        """Job ids in the queue."""
        done = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env(), capture_output=True,
                              text=True, timeout=20)
        return done.stdout.split()

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "-u", "root"], env=self.env(),
                           capture_output=True, timeout=20)
        for name in reversed(DAEMONS):  # slurmd first, munged last
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        if self._previous_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._previous_conf
