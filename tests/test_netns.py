"""Emulated hosts: real dask scheduler/worker processes in network namespaces on tc-shaped links."""
from __future__ import annotations

import os
import subprocess

import pytest

from daskbelief.testing import netns
from daskbelief.testing.netns import Network, qdisc_args

REASON = netns.unavailable_reason()
needs_namespaces = pytest.mark.skipif(REASON is not None, reason=f"no network namespaces: {REASON}")


def test_link_settings_become_tc_arguments():
    assert qdisc_args("1gbit")[:3] == ["tbf", "rate", "1gbit"]
    # the bucket holds 1 ms of a fast link, and never less than two 64 KiB GSO packets
    assert qdisc_args("10gbit")[qdisc_args("10gbit").index("burst") + 1] == "1250000"
    assert qdisc_args("100mbit")[qdisc_args("100mbit").index("burst") + 1] == str(2 * 65536)
    assert qdisc_args("100mbit", 0.5)[:3] == ["netem", "delay", "0.5ms"]
    with pytest.raises(ValueError, match="bandwidth '2gbit'"):
        qdisc_args("2gbit")
    with pytest.raises(ValueError, match="latency_ms"):
        qdisc_args("1gbit", -1)


def train_digits(client, path: str) -> dict:
    """The driver's part: Downpour R=2 on the digits store, from inside the driver namespace."""
    from daskbelief.cluster import worker_info
    from daskbelief.nn import Dense, Sequential
    from daskbelief.optim.rules import adagrad
    from daskbelief.train.downpour import downpour

    model = Sequential((64,), [Dense(128, activation="relu"), Dense(10)], l2=1e-4)
    result = downpour(model, path, test=path, client=client, replicas=2, shards=2, n_fetch=5,
                      n_push=5, rule=adagrad(lr=0.05), batch_size=32, epochs=30,
                      warmstart_steps=20, seed=0)
    return {"accuracy": result.summary["test_accuracy"], "workers": sorted(worker_info(client))}


def tcp_rate(client, nbytes: int) -> float:
    """GB/s of a plain socket from worker w0 to worker w1."""
    from daskbelief.cluster import worker_info
    from daskbelief.testing.tcp import tcp_gbps

    by_name = {info["name"]: addr for addr, info in worker_info(client).items()}
    return tcp_gbps(client, by_name["w0"], by_name["w1"], nbytes)


@needs_namespaces
def test_downpour_trains_across_namespaces_on_shaped_links(digits_path):
    with Network(workers=2, bandwidth="100mbit") as net:
        links = net.links()
        assert set(links) == {"sched", "w0", "w1", "drv"}
        for host, ends in links.items():
            for end in ("host", "bridge"):
                assert ends[end]["rate_bits"] == 100e6, (host, end, ends)
        # the shaping acts: a plain socket cannot beat the link (tbf's 128 KiB burst aside)
        gbps = net.call(f"{__name__}:tcp_rate", nbytes=4_000_000)
        assert 0 < gbps * 8 <= 0.1 * 1.1, gbps
        net.shape("1gbit")
        assert {e["rate_bits"] for ends in net.links().values() for e in ends.values()} == {1e9}
        out = net.call(f"{__name__}:train_digits", path=digits_path)
    assert all(w.startswith(f"tcp://{netns.SUBNET}.") for w in out["workers"]), out
    assert out["accuracy"] >= 0.96, out


@needs_namespaces
def test_everything_made_is_removed_also_when_the_body_fails():
    with pytest.raises(ZeroDivisionError):
        with Network(workers=1, bandwidth="10gbit") as net:
            made, pids = list(net._made), net.pids()
            assert len(made) == 4 and len(pids) >= 2  # bridge + 3 hosts; scheduler, nanny
            1 / 0
    assert not set(made) & set(netns.our_namespaces())
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]
    assert not os.path.exists(net.logs)
    veths = subprocess.run(["ip", "-o", "link", "show", "type", "veth"], capture_output=True,
                           text=True).stdout
    assert net.name not in veths


@needs_namespaces
def test_a_dead_owners_namespaces_are_found_and_removed():
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"{netns.PREFIX}-{dead.pid}-0-w0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    mine = f"{netns.PREFIX}-{os.getpid()}-999-w0"  # a live owner's namespace is left alone
    subprocess.run(["ip", "netns", "add", mine], check=True)
    try:
        assert netns.remove_leftovers() == [name]
        assert name not in netns.our_namespaces() and mine in netns.our_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", mine], check=True)


@needs_namespaces
def test_latency_is_set_and_read_back_where_the_kernel_has_netem():
    if not netns.has_netem():
        pytest.skip("this kernel has no netem qdisc: latency cannot be emulated (bandwidth can)")
    with Network(workers=1, bandwidth="1gbit", latency_ms=0.5) as net:
        host = net.links()["w0"]["host"]
    assert host["kind"] == "netem" and host["rate_bits"] == 1e9 and host["delay_ms"] == 0.5
