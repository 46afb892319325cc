"""Emulated hosts: a real ``dask scheduler`` and real ``dask worker`` processes, each in its own
Linux network namespace, joined through a bridge by veth links whose bandwidth (and, where the
kernel has ``netem``, latency) ``tc`` sets.

Loopback inside one machine makes communication nearly free; DistBelief's design (sharded
parameter server, n_fetch/n_push, model partitions exchanging only boundaries) answers a network.
This harness puts one between the processes without a second machine::

    with Network(workers=3, bandwidth="1gbit") as net:
        net.links()                                   # the tc settings read back
        net.call("benchmarks.network:point", n=5)     # fn(client, n=5) run by a driver process

Topology, all inside ``SUBNET`` (one private /24; no other address is ever used): a namespace
holding only the bridge, one namespace per host (``sched``: the scheduler, ``w0``...: one worker
each, ``drv``: the driver) and one veth pair per host, ``eth0`` inside the host, its peer a bridge
port. Every link is shaped at both ends (host egress and bridge-port egress), so a host can
neither send nor receive faster than its link. The driver -- the code given to ``call`` -- runs in
a subprocess inside ``drv``: the test or benchmark process itself never touches the network and
adds no route to the root namespace.

Everything made is named ``dbnet-<pid>-<n>-...``; ``close`` (run by the context manager, by
``atexit``, and for a dead owner's leftovers by the next ``Network``) kills every process in the
namespaces and deletes them, which deletes their links.
"""
from __future__ import annotations

import atexit
import importlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from daskbelief.cluster import worker_environ

SUBNET = "10.250.47"  # the one private /24 the harness uses, inside its own namespaces only
PREFIX = "dbnet"
SCHEDULER_PORT = 8786
BANDWIDTHS = {"10gbit": 10e9, "1gbit": 1e9, "100mbit": 100e6}  # bits per second
LOOPBACK_NOTE = ("all hosts share one machine's cores and memory bus: the 10gbit point is bounded "
                 "by loopback copies, not by the link")

_counter = itertools.count()


class NetworkUnavailable(RuntimeError):
    """Namespaces (or the qdisc a setting needs) cannot be made on this machine."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode:
        raise NetworkUnavailable(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _in(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` inside namespace ``ns`` and wait for it."""
    return _ip("netns", "exec", ns, *cmd, check=check)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no iproute2, no permission), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (the harness runs ip netns / tc)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"iproute2 is not installed ({', '.join(missing)} not found)"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except NetworkUnavailable as e:
        return f"cannot create a network namespace: {e}"
    _ip("netns", "del", probe, check=False)
    return None


def has_netem() -> bool:
    """Whether the kernel has the netem qdisc (needed for latency; bandwidth needs only tbf)."""
    probe = f"{PREFIX}-{os.getpid()}-netem"
    _ip("netns", "add", probe)
    try:
        return _in(probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                   check=False).returncode == 0
    finally:
        _ip("netns", "del", probe, check=False)


def qdisc_args(bandwidth: str, latency_ms: float = 0.0) -> list[str]:
    """The ``tc qdisc add ... root`` arguments for a link of ``bandwidth`` (a ``BANDWIDTHS`` key)
    and one-way ``latency_ms``: tbf when there is no latency (the token bucket holds one
    millisecond of traffic, and at least two 64 KiB GSO packets, so fast links are not held back
    by the timer tick), netem delay + rate otherwise."""
    if bandwidth not in BANDWIDTHS:
        raise ValueError(f"bandwidth {bandwidth!r}: choose one of {', '.join(BANDWIDTHS)}")
    if latency_ms < 0:
        raise ValueError(f"latency_ms must be >= 0, got {latency_ms}")
    if latency_ms:
        return ["netem", "delay", f"{latency_ms}ms", "rate", bandwidth, "limit", "100000"]
    burst = max(int(BANDWIDTHS[bandwidth] / 8 / 1000), 2 * 65536)
    return ["tbf", "rate", bandwidth, "burst", str(burst), "latency", "50ms"]


def link_setting(qdisc: dict) -> dict:
    """What ``tc -j qdisc show`` says a link does: kind, rate in bits/s, one-way delay in ms."""
    opts = qdisc.get("options", {})
    rate = opts.get("rate")
    if isinstance(rate, dict):  # netem nests its rate
        rate = rate.get("rate")
    delay = opts.get("delay")
    if isinstance(delay, dict):
        delay = delay.get("delay")
    return {"kind": qdisc.get("kind"), "rate_bits": None if rate is None else 8 * float(rate),
            "delay_ms": 0.0 if not delay else 1e3 * float(delay)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(name: str) -> int | None:
    parts = name.split("-")
    return int(parts[1]) if len(parts) > 2 and parts[0] == PREFIX and parts[1].isdigit() else None


def our_namespaces() -> list[str]:
    """Every namespace named by this harness (any owner)."""
    listing = _ip("netns", "list", check=False).stdout.split("\n")
    return [line.split()[0] for line in listing if line.startswith(PREFIX + "-")]


def _delete_namespace(ns: str) -> None:
    """Kill every process inside ``ns``, then delete it (its links go with it)."""
    for _ in range(50):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    _ip("netns", "del", ns, check=False)


def remove_leftovers() -> list[str]:
    """Delete the namespaces of harnesses whose process is gone (a run killed before its
    cleanup); returns their names."""
    gone = [ns for ns in our_namespaces() if (pid := _owner(ns)) is not None and not _pid_alive(pid)]
    for ns in gone:
        _delete_namespace(ns)
    return gone


class Network:
    """A scheduler, ``workers`` worker hosts and a driver host, each in its own namespace, on
    links of ``bandwidth`` and ``latency_ms`` (``shape`` changes them while everything runs)."""

    def __init__(self, workers: int = 2, bandwidth: str = "1gbit", latency_ms: float = 0.0, *,
                 nthreads: int = 1, memory_limit: str = "0", start_timeout: float = 120.0):
        qdisc_args(bandwidth, latency_ms)  # bad settings fail before anything is made
        self.n_workers, self.nthreads, self.memory_limit = workers, nthreads, memory_limit
        self.start_timeout = start_timeout
        self.name = f"{PREFIX}-{os.getpid()}-{next(_counter)}"
        self.hosts = ["sched", *[f"w{i}" for i in range(workers)], "drv"]
        self.address = {h: f"{SUBNET}.{i + 1}" for i, h in enumerate(self.hosts)}
        self.address["drv"] = f"{SUBNET}.254"
        self.scheduler = f"tcp://{self.address['sched']}:{SCHEDULER_PORT}"
        self.setting = (bandwidth, latency_ms)
        self.procs: list[subprocess.Popen] = []
        self.logs: Path | None = None  # the processes' output, made by ``start``
        self._made: list[str] = []
        self._open = False

    def ns(self, host: str) -> str:
        return f"{self.name}-{host}"

    @property
    def bridge(self) -> str:
        return f"{self.name}-br"

    # -- life ---------------------------------------------------------------------------------
    def __enter__(self) -> "Network":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Make the namespaces and links, shape them, start the scheduler and the workers."""
        reason = unavailable_reason()
        if reason:
            raise NetworkUnavailable(reason)
        remove_leftovers()
        atexit.register(self.close)
        self._open = True
        self.logs = Path(tempfile.mkdtemp(prefix=self.name + "-"))
        try:
            self._make_links()
            self.shape(*self.setting)
            self._start_processes()
        except BaseException:
            self.close()
            raise

    def _make_links(self) -> None:
        _ip("netns", "add", self.bridge)
        self._made.append(self.bridge)
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge, "link", "set", "br0", "up")
        for host in self.hosts:
            ns = self.ns(host)
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("link", "add", "name", "eth0", "netns", ns, "type", "veth",
                "peer", "name", host, "netns", self.bridge)
            _ip("-n", self.bridge, "link", "set", host, "master", "br0")
            _ip("-n", self.bridge, "link", "set", host, "up")
            _ip("-n", ns, "addr", "add", f"{self.address[host]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def shape(self, bandwidth: str, latency_ms: float = 0.0) -> None:
        """Set every link to ``bandwidth``; the one-way ``latency_ms`` is added at the host end
        (netem; NetworkUnavailable where the kernel lacks it)."""
        host_q = qdisc_args(bandwidth, latency_ms)
        port_q = qdisc_args(bandwidth)
        for host in self.hosts:
            for ns, dev, q in ((self.ns(host), "eth0", host_q), (self.bridge, host, port_q)):
                _in(ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
                done = _in(ns, "tc", "qdisc", "add", "dev", dev, "root", *q, check=False)
                if done.returncode:
                    raise NetworkUnavailable(f"tc qdisc add {' '.join(q)} on {host}: "
                                             f"{done.stderr.strip()}")
        self.setting = (bandwidth, latency_ms)

    def links(self) -> dict:
        """Each host's link as the kernel reports it: ``{host: {"host": ..., "bridge": ...}}``
        with ``link_setting`` of the root qdisc at the host end and at the bridge port."""
        out = {}
        for host in self.hosts:
            ends = {}
            for end, ns, dev in (("host", self.ns(host), "eth0"), ("bridge", self.bridge, host)):
                qdiscs = json.loads(_in(ns, "tc", "-j", "qdisc", "show", "dev", dev).stdout)
                ends[end] = link_setting(next(q for q in qdiscs if q.get("root")))
            out[host] = ends
        return out

    def _spawn(self, host: str, *cmd: str) -> None:
        log = open(self.logs / f"{host}.log", "wb")
        env = {**os.environ, "PYTHONPATH": _pythonpath(), **worker_environ()}
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", self.ns(host), *cmd], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, start_new_session=True))
        log.close()

    def _start_processes(self) -> None:
        dask = (sys.executable, "-m", "dask")  # the `dask` command of this interpreter
        self._spawn("sched", *dask, "scheduler", "--host", self.address["sched"],
                    "--port", str(SCHEDULER_PORT), "--no-dashboard")
        for i in range(self.n_workers):
            host = f"w{i}"
            self._spawn(host, *dask, "worker", self.scheduler, "--host", self.address[host],
                        "--name", host, "--nthreads", str(self.nthreads), "--no-dashboard",
                        "--memory-limit", self.memory_limit, "--death-timeout", "60")

    def close(self) -> None:
        """Stop every process and delete every namespace made (idempotent)."""
        if not self._open:
            return
        self._open = False
        atexit.unregister(self.close)
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        for ns in reversed(self._made):
            _delete_namespace(ns)
        shutil.rmtree(self.logs, ignore_errors=True)

    # -- the driver ---------------------------------------------------------------------------
    def call(self, target: str, timeout: float = 300.0, **kwargs):
        """Run ``module:function(client, **kwargs)`` in a driver process inside the ``drv``
        namespace, connected to the scheduler once every worker has joined; returns what the
        function returns (JSON). The driver's output is echoed; a failure raises with its tail
        and the tails of the processes' logs."""
        cmd = ["ip", "netns", "exec", self.ns("drv"), sys.executable, "-m", __name__, self.scheduler,
               str(self.n_workers), str(self.start_timeout), target, json.dumps(kwargs)]
        env = {**os.environ, "PYTHONPATH": _pythonpath()}
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            driver = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                      env=env, text=True)
            try:
                self._wait_driver(driver, target, timeout)
            finally:
                if driver.poll() is None:
                    driver.kill()
                    driver.wait(timeout=10)
            out.seek(0), err.seek(0)
            stdout, stderr = out.read(), err.read()
        lines = stdout.rstrip("\n").split("\n")
        sys.stdout.write("\n".join(lines[:-1]) + ("\n" if len(lines) > 1 else ""))
        if driver.returncode:
            raise RuntimeError(f"driver {target} failed (exit {driver.returncode}):\n"
                               f"{stderr[-3000:]}{self._tails()}")
        return json.loads(lines[-1])

    def _wait_driver(self, driver: subprocess.Popen, target: str, timeout: float) -> None:
        """Wait for the driver to exit, at most ``timeout`` seconds, and no longer than the
        scheduler and every worker process stay alive."""
        deadline = time.monotonic() + timeout
        while driver.poll() is None:
            dead = [p.args[4:8] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"driver {target}: a cluster process exited while it ran "
                                   f"({dead[0]}){self._tails()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"driver {target} did not finish within {timeout:.0f} s"
                                   f"{self._tails()}")
            time.sleep(0.2)

    def _tails(self) -> str:
        return "".join(f"\n--- {log.name} ---\n{log.read_text(errors='replace')[-1500:]}"
                       for log in sorted(self.logs.glob("*.log")))

    def pids(self) -> list[int]:
        """Every process inside this network's namespaces now."""
        return [int(p) for ns in self._made
                for p in _ip("netns", "pids", ns, check=False).stdout.split()]


def _pythonpath() -> str:
    """What this process can import, the driver and the workers can too (tests, benchmarks)."""
    return os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)


def _drive(scheduler: str, n_workers: int, start_timeout: float, target: str, kwargs: str) -> None:
    """The driver process: wait for the workers, run the target, print its result as JSON."""
    from distributed import Client

    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    with Client(scheduler, timeout=start_timeout) as client:
        try:
            client.wait_for_workers(n_workers, timeout=start_timeout)
        except TimeoutError as e:
            raise TimeoutError(f"waited {start_timeout:.0f} s for {n_workers} workers at "
                               f"{scheduler}") from e
        result = fn(client, **json.loads(kwargs))
    sys.stdout.flush()
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    _drive(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5])
