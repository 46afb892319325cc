"""ParameterShard: one Dask actor owning a contiguous slice of the flat parameter vector.

The shard applies the update rule to its own slice, on its own, as DistBelief's parameter-server
shards do: Adagrad's per-parameter learning rates need nothing from other shards, and the rule
state is the same length as the parameters, so slicing the vector is sharding the optimiser.

For Sandblaster the shard also holds named vectors (gradient, search direction, L-BFGS history),
each its own slice, and executes vector operations on them locally, returning only scalars.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
import weakref

import numpy as np
from distributed import get_worker

from daskbelief.backend import all_finite, get_backend, namespace, to_numpy, unaligned
from daskbelief.optim.rules import make_rule
from daskbelief.optim.vectors import LocalVectors, finish_gradient  # the reference's own code
from daskbelief.optim.staleness import delay_compensate
from daskbelief.ps.asynchrony import Clocks, FetchedCopies
from daskbelief.ps.policy import adoptable
from daskbelief.ps import shared
from daskbelief.ps.compress import decode, payload_bytes, to_bf16

STALENESS_BINS = 64  # staleness >= this lands in the last histogram bin
# Values the update rule is applied to at a time: 256 KB of float32, so the rule's passes over a
# block (Adagrad makes seven) run in a core's L2 with the parameters and state beside it
# (measured on a 100 MB slice, one core: 42 ms with 64K-value blocks, 57 ms with 1M-value ones).
APPLY_BLOCK = 1 << 16
EARLY = "early"  # read_evaluated's answer to a read that overtook its evaluation's opening
ADOPT_TIMEOUT = 30.0  # seconds a copy arriving frame by frame holds the shard before another may


def early(replies) -> list[int]:
    """The indices of ``read_evaluated`` replies that came early (ask those shards again)."""
    return [i for i, r in enumerate(replies) if isinstance(r, str) and r == EARLY]


class ParameterShard:
    """Holds ``params[start:stop]``, the update rule's state for it, and Sandblaster's vectors.

    Methods run one at a time on the worker's actor thread, so no locking is needed; ``fetch``
    returns a copy because the reply is serialised after the method returns, while later pushes
    may already be changing the slice in place.
    """

    def __init__(self, index: int, start: int, stop: int, values, rule: dict | str = "adagrad",
                 backend: str = "numpy"):
        if len(values) != stop - start:
            raise ValueError(f"shard {index}: got {len(values)} values for range [{start}, {stop})")
        xp = get_backend(backend)
        self.index, self.start, self.stop = index, start, stop
        # on the host, in memory that replicas of this host map (``ps.shared``)
        self.segment = shared.Segment.create(stop - start) if xp is np and shared.enabled() else None
        if self.segment is None:
            self.params = xp.array(values, dtype=np.float32, copy=True)
        else:
            self.params = self.segment.values
            self.params[...] = np.asarray(values, dtype=np.float32)
        self.attached = shared.Attached()  # replicas' push buffers mapped here
        self.mailbox = self._open_mailbox()
        self.rule = make_rule(rule)
        self.state = self.rule.init(self.params)
        self.version = 0
        self.applied = 0
        self.rejected = 0
        self.per_replica: dict[str, int] = {}
        self.replica_steps: dict[str, int] = {}  # steps each replica had done by its last push
        self._parts: dict[str, tuple[int, bool]] = {}  # frames seen of pushes still arriving
        self._scratch = np.empty(0, np.float32)  # where an unaligned push is copied (``_aligned``)
        self.staleness_hist = np.zeros(STALENESS_BINS, dtype=np.int64)
        self.staleness_sum = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.fetches = 0
        self.started = time.time()
        self.vectors = LocalVectors(stop - start, dtype=np.float32, xp=xp)
        self.vectors.set("params", self.params)
        self._objective: ObjectiveSlice | None = None  # Sandblaster: set by ``prepare_objective``
        # asynchrony (ps.asynchrony): fetched copies for delay compensation, clocks for a bound
        self.fetched = FetchedCopies(stop - start) if self.rule.delay_compensation else None
        self.clocks = Clocks()
        self.compensated = 0
        # the server generation a recovery created this shard in; the copy on its way (token,
        # since, its version); updates the adopted copies brought
        self.replaced_in: int | None = None
        self._adopting: tuple[str, float, int] | None = None
        self.adopted = 0
        # since an adoption: (updates the rule state had seen, the adopted version, ``applied``
        # then), the state lagging the parameters' history (``_younger_state_scale``)
        self._since_adoption: tuple[int, int, int] | None = None

    # -- Downpour -------------------------------------------------------------------------------
    def push(self, grad, base_version: int, replica: str = "", offset: int = 0,
             steps_done: int | None = None, part: tuple[str, int] | None = None) -> int:
        """Apply one update from a gradient computed on parameters of version ``base_version``.

        ``grad`` covers ``[offset, offset + len(grad))`` of this shard's slice (a model-parallel
        block pushes only its own ranges); updating a sub-slice is exact because every rule is
        elementwise. ``part=(token, n)``: one of the ``n`` frames of a push that travels as several
        calls (a slice larger than one comm frame, see ``server.push_slice``), arriving in any
        order; each is applied on arrival, and the push counts as one update once all have
        arrived, none of them dropped. On the host the rule runs over blocks of ``APPLY_BLOCK``
        values, so its temporaries stay in cache and are reused instead of being allocated (and
        page-faulted) at the size of the push. Non-finite gradients are counted and dropped: one
        bad replica must never poison the shared parameters.
        """
        xp = namespace(self.params)
        if isinstance(grad, shared.Ref):  # a buffer of a replica on this host, read where it lies
            grad = self.attached.view(grad)
        self.bytes_in += payload_bytes(grad)
        grad = self._aligned(xp.asarray(decode(grad)))
        size = APPLY_BLOCK if xp is np else max(len(grad), 1)  # a GPU wants one launch per pass
        blocks = [grad[i:i + size] for i in range(0, len(grad), size)]
        finite = all_finite(grad)
        complete = part is None or self._arrived(*part, finite)
        if not finite:
            self.rejected += 1
            return self.version
        end = offset + len(grad)
        if not 0 <= offset < end <= len(self.params):
            raise ValueError(f"shard {self.index}: push of {end - offset} values at offset {offset} "
                             f"does not fit its {len(self.params)} parameters")
        staleness = max(self.version - int(base_version), 0)
        scale = self.rule.step_scale(staleness) * self._younger_state_scale()
        fetched = None if self.fetched is None else self.fetched.get(replica, int(base_version))
        with self._writing():
            for g in blocks:
                span = slice(offset, offset + len(g))
                if fetched is not None:
                    g = delay_compensate(g, self.params[span], xp.asarray(fetched[span]),
                                         self.rule.delay_compensation)
                self.rule.apply(self.params[span], g, {k: v[span] for k, v in self.state.items()},
                                scale)
                offset += len(g)
            if complete:
                self._set_version(self.version + 1)
        self.compensated += fetched is not None and complete
        if not complete:
            return self.version
        self.staleness_hist[min(staleness, STALENESS_BINS - 1)] += 1
        self.staleness_sum += staleness
        self.applied += 1
        self.per_replica[replica] = self.per_replica.get(replica, 0) + 1
        self.clocks.tick(replica, time.time())
        if steps_done is not None:  # what a checkpoint needs to resume the replica exactly
            self.replica_steps[replica] = max(self.replica_steps.get(replica, 0), int(steps_done))
        return self.version

    def _open_mailbox(self):
        """Where replicas of this host send pushes without distributed's messages
        (``ps.shared.Mailbox``): run on the actor thread of the worker this shard lives in;
        None outside a worker or without shared memory."""
        try:
            executor = get_worker().executors["actor"]
        except (ValueError, KeyError):
            return None
        if self.segment is None:
            return None
        mailbox = shared.Mailbox(self.push, executor)
        weakref.finalize(self, mailbox.close)
        self.segment.ref = dataclasses.replace(self.segment.ref, mail=mailbox.fd)
        return mailbox

    def _writing(self):
        """Held while the parameters change: a replica copying them out of shared memory waits
        (``ps.shared``), so no fetch sees half an update."""
        return contextlib.nullcontext() if self.segment is None else self.segment.locked()

    def _set_version(self, version: int) -> None:
        """The version, also where replicas reading shared memory find it (call while
        ``_writing``)."""
        self.version = version
        if self.segment is not None:
            self.segment.header[shared.VERSION] = version

    def shared_ref(self):
        """Where replicas of this host map the parameters (``ps.shared.Ref``); None when they
        cannot (on a GPU, or shared memory off)."""
        return None if self.segment is None else self.segment.ref

    def _aligned(self, grad):
        """``backend.aligned``, copying into a buffer this shard keeps: over TCP the frames of a
        push arrived unaligned in every trace taken, and a new array for each would be faulted
        in anew."""
        if not unaligned(grad):
            return grad
        if self._scratch.dtype != grad.dtype or len(self._scratch) < len(grad):
            self._scratch = np.empty(len(grad), grad.dtype)
        out = self._scratch[:len(grad)]
        np.copyto(out, grad)
        return out

    def _arrived(self, token: str, n: int, applied: bool) -> bool:
        """Record one frame of push ``token``: True when it is the last of its ``n`` frames to
        arrive and every one of them was applied."""
        seen, good = self._parts.pop(token, (0, True))
        seen, good = seen + 1, good and applied
        if seen < n:
            self._parts[token] = (seen, good)
            return False
        return good

    def fetch(self, offset: int = 0, length: int | None = None, kind: str | None = None,
              replica: str = ""):
        """A copy of ``params[offset:offset+length]`` of this slice and the shard's version;
        ``kind="bf16"``: the values rounded to bf16 (half the bytes on the link). With delay
        compensation, what ``replica`` was sent is kept (``FetchedCopies``)."""
        stop = len(self.params) if length is None else offset + length
        if kind is None:
            values = self.params[offset:stop].copy()
        elif kind == "bf16":
            values = ("bf16", to_bf16(to_numpy(self.params[offset:stop])))
        else:
            raise ValueError(f"fetches travel exact (None) or as 'bf16', not {kind!r}")
        self.bytes_out += payload_bytes(values)
        if self.fetched is not None and replica:
            self.fetched.record(replica, self.version, offset, to_numpy(decode(values)))
        self.fetches += 1
        return values, self.version

    def wants(self, version: int, generation: int) -> str | None:
        """A token to send this shard a replica's copy of its slice with (``adopt``), when the
        copy, fetched at ``version`` from the server of ``generation``, is worth taking
        (``policy.adoptable``); None otherwise, or while a copy at least as new is on its way
        (one not finished within ``ADOPT_TIMEOUT`` no longer counts). Asked before a copy is
        sent, so the replicas do not all send theirs; a newer copy takes over from an older
        one on its way (whose frames are then ignored), so the newest offered is the one kept."""
        held = self._adopting
        if held is not None and time.time() - held[1] < ADOPT_TIMEOUT and held[2] >= version:
            return None
        if not adoptable(self.replaced_in, self.version, version, generation):
            return None
        token = uuid.uuid4().hex
        self._adopting = (token, time.time(), int(version))
        return token

    def adopt(self, values, token: str, offset: int = 0, n_frames: int = 1) -> int:
        """Take a replica's copy of this slice, which ``wants`` gave ``token`` to, in place of the
        checkpoint or initial values this recreated shard came from; its version becomes the
        copy's once the last of its ``n_frames`` frames (``values`` at ``offset`` each) is in.
        The rule state stays the restored one. Returns the version.

        Why: with no checkpoint, or an old one, a shard lost late in a run would otherwise take
        its slice back to where that run started; each plain replica holds the slice as it last
        fetched it.
        """
        held = self._adopting
        if held is None or held[0] != token:
            return self.version
        xp = namespace(self.params)
        with self._writing():
            self.params[offset:offset + len(values)] = xp.asarray(values)
            if self._arrived(token, n_frames, True):
                version = max(held[2], self.version)
                self._adopting = None
                self.adopted += version - self.version
                self._since_adoption = (self._state_updates(), version, self.applied)
                self._set_version(version)
                if self.fetched is not None:  # what replicas fetched before is no base to correct
                    self.fetched = FetchedCopies(len(self.params))
        return self.version

    def _state_updates(self) -> int:
        """Updates the rule state has seen: as many as the version counts, unless a copy was
        adopted since it was restored."""
        if self._since_adoption is None:
            return self.version
        state, _, applied = self._since_adoption
        return state + self.applied - applied

    def _younger_state_scale(self) -> float:
        """The learning-rate factor of the next push after an adoption: the rule state restored
        with the shard (a checkpoint's, or fresh) has seen fewer updates than the adopted
        parameters, which some rules' steps depend on (``UpdateRule.younger_state_scale``; on
        the paper's speech task, a shard lost at 80% of a run without checkpoints ended at
        0.256 test accuracy with Adagrad's fresh accumulator, 0.417-0.420 with this factor,
        0.414 undisturbed)."""
        if self._since_adoption is None:
            return 1.0
        _, adopted, applied = self._since_adoption
        pushes = self.applied - applied + 1
        return self.rule.younger_state_scale(self._state_updates() + 1, adopted + pushes)

    def lead(self, replica: str) -> int:
        """Complete pushes ``replica`` is ahead of the slowest replica (a staleness bound)."""
        return self.clocks.lead(replica, time.time())

    def leave(self, replica: str) -> None:
        """``replica`` has finished: the slowest clock no longer counts it."""
        self.clocks.leave(replica)

    def stats(self) -> dict:
        """Counters for monitoring and tests: updates applied/rejected, staleness, traffic (with
        the fetches replicas of this host made from shared memory)."""
        read = (0, 0) if self.segment is None else (
            int(self.segment.header[shared.FETCHES]), int(self.segment.header[shared.BYTES_OUT]))
        return {
            "shard": self.index, "start": self.start, "stop": self.stop, "version": self.version,
            "applied": self.applied, "rejected": self.rejected, "fetches": self.fetches + read[0],
            "compensated": self.compensated, "max_lead": self.clocks.max_lead,
            "per_replica": dict(self.per_replica), "replica_steps": dict(self.replica_steps),
            "staleness_hist": self.staleness_hist.tolist(),
            "staleness_mean": self.staleness_sum / self.applied if self.applied else 0.0,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out + read[1],
            "uptime": time.time() - self.started, "adopted": self.adopted,
            "params_finite": bool(namespace(self.params).isfinite(self.params).all()),
        }

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Parameters, rule state and version as host arrays, for a checkpoint of this shard."""
        return {"params": to_numpy(self.params).copy(),
                "state": {k: to_numpy(v).copy() for k, v in self.state.items()},
                "version": self.version, "applied": self.applied}

    def write_checkpoint(self, path: str, vectors=()) -> dict:
        """Write this shard's slice, rule state and the named ``vectors`` (Sandblaster's) into
        the checkpoint group at ``path``.

        The driver created the arrays; each shard fills only its own, so a checkpoint costs one
        parallel write and no parameter ever passes through the driver. Returns the version and
        the per-replica update counts saved with it (consistent: the actor thread runs one method
        at a time), from which a resumed run knows how far each replica had got.
        """
        import zarr

        group = zarr.open_group(path, mode="r+")
        group[f"shard-{self.index}/params"][:] = to_numpy(self.params)
        for name, values in self.state.items():
            group[f"shard-{self.index}/state/{name}"][:] = to_numpy(values)
        for name in vectors:
            group[f"shard-{self.index}/vectors/{name}"][:] = to_numpy(self.vectors.get(name))
        return {"version": self.version, "applied": self.applied, "state_updates": self._state_updates(),
                "per_replica": dict(self.per_replica), "replica_steps": dict(self.replica_steps)}

    def state_names(self) -> list[str]:
        """Names of the update rule's state arrays (what a checkpoint must hold besides params)."""
        return sorted(self.state)

    def load_state(self, snapshot: dict) -> int:
        """Restore what ``state_dict`` saved (a recreated shard resumes from a checkpoint)."""
        xp = namespace(self.params)
        if len(snapshot["params"]) != len(self.params):
            raise ValueError(f"shard {self.index}: checkpoint slice has {len(snapshot['params'])} "
                             f"values, shard has {len(self.params)}")
        with self._writing():
            self.params[...] = xp.asarray(snapshot["params"])
            self._set_version(int(snapshot["version"]))
        for k, v in snapshot["state"].items():
            self.state[k][...] = xp.asarray(v)
        self.applied = int(snapshot.get("applied", 0))
        self.replaced_in = snapshot.get("replaced_in")
        # a state saved younger than its parameters (an adopted copy) keeps its scale
        state_updates = int(snapshot.get("state_updates", self.version))
        self._since_adoption = ((state_updates, self.version, self.applied)
                                if state_updates < self.version else None)
        return self.version

    def restore(self, path: str) -> int:
        """Load this shard's range of checkpoint ``path`` -- the parameters, the update rule's
        state and Sandblaster's vectors; the checkpoint may have been cut into other ranges --
        at the newest version any of its shards had. Every shard of a resumed run reads its
        own range, in parallel, and none of it passes through the driver."""
        from daskbelief.ps import checkpoint

        saved = checkpoint.load(path, self.start, self.stop)
        version = max(saved.versions)
        self.load_state({"params": saved.params, "state": saved.state, "version": version,
                         "state_updates": version - saved.state_lag(self.start, self.stop)})
        xp = namespace(self.params)
        for name, values in saved.vectors.items():
            self.vectors.set(name, xp.asarray(values))
        return self.version

    # -- Sandblaster: vectors held on the shard ---------------------------------------------------
    def run_ops(self, ops: list[tuple]) -> list:
        """Execute operations ``(name, *args)`` in order; return their results (None or scalars).

        Ops arrive in batches so that the coordinator pays one round trip for several of them
        (``ShardedVectors`` queues the ones that return nothing and sends them with the next one
        that returns something). A name is a vector operation (``LocalVectors``: copy, axpy,
        scale, swap, mul, zeros, dot, dots; a dot returns this shard's float64 partial sum) or one
        of the evaluation steps ``open_evaluation`` / ``finish_evaluation``.
        """
        return [self._op(name, args) for name, *args in ops]

    def _op(self, name: str, args):
        if name in VECTOR_OPS:
            return getattr(self.vectors, name)(*args)
        if name in EVALUATION_OPS:
            return getattr(self, name)(*args)
        raise ValueError(f"shard {self.index}: unknown operation {name!r} (vector operations: "
                         f"{', '.join(sorted(VECTOR_OPS))}; evaluation steps: "
                         f"{', '.join(sorted(EVALUATION_OPS))})")

    def prepare_objective(self, model, n_rows: int) -> None:
        """Get ready to hold this slice of Sandblaster's batch objective (``ObjectiveSlice``)."""
        xp = namespace(self.params)
        self._objective = ObjectiveSlice(
            mask=xp.asarray(model.decay_mask()[self.start:self.stop]), n=int(n_rows),
            l2=float(model.l2), acc=xp.zeros(self.stop - self.start, dtype=np.float64))

    def _evaluation(self) -> ObjectiveSlice:
        if self._objective is None:
            raise RuntimeError(f"shard {self.index}: prepare_objective was not called")
        return self._objective

    def open_evaluation(self, tag, x_name: str) -> None:
        """Start evaluating the objective at vector ``x_name``: zero the accumulator and accept
        only contributions tagged ``tag`` from now on.

        A new tag per evaluation (and per restart of one) means a contribution from an abandoned
        evaluation -- a late copy, a worker presumed lost -- can never leak into this one.
        """
        ev = self._evaluation()
        self.vectors.get(x_name)  # fail here, not in every worker, when the vector is missing
        ev.acc.fill(0.0)
        ev.tag, ev.x, ev.won, ev.opened = tag, x_name, {}, tag

    def read_evaluated(self, tag, offset: int = 0, length: int | None = None):
        """This slice (or its ``[offset, offset + length)`` part, what a model-parallel block
        owns) of the vector being evaluated under ``tag``, a copy; None when ``tag`` is not the
        open evaluation: the caller is a leftover of an abandoned one; ``EARLY`` when ``tag`` is
        newer than any opened here: the coordinator opens an evaluation while its portions are
        on their way, and this read overtook the opening (ask again)."""
        ev = self._evaluation()
        if ev.tag != tag:
            return EARLY if ev.opened is None or tag > ev.opened else None
        ev.reads += 1
        vector = self.vectors.get(ev.x)
        values = vector[offset:len(vector) if length is None else offset + length].copy()
        self.bytes_out += values.nbytes
        return values

    def read(self, name: str):
        """A copy of this slice of vector ``name`` (results, test evaluations, tests)."""
        values = self.vectors.get(name).copy()
        self.bytes_out += values.nbytes
        return values

    def accumulate(self, tag, values, offset: int = 0, portions: dict | None = None) -> bool:
        """Add float64 portion sums into the accumulator when ``tag`` is the open evaluation;
        ``portions``: ``{portion: (worker, loss, backup)}`` of those the sums hold (a whole-slice
        push names them, so the shard knows when it holds the whole batch).

        Returns whether they were added. Non-finite values are added like any others: the
        reference objective lets them through too, and the line search backs off from them.
        """
        ev = self._evaluation()
        values = namespace(self.params).asarray(values)
        self.bytes_in += values.nbytes
        if ev.tag != tag:
            ev.refused += 1
            return False
        end = offset + len(values)
        if not 0 <= offset < end <= len(ev.acc):
            raise ValueError(f"shard {self.index}: {len(values)} values at offset {offset} do not "
                             f"fit its {len(ev.acc)} elements")
        ev.acc[offset:end] += values
        ev.won.update(portions or {})
        ev.accepted += 1
        return True

    def finish_evaluation(self, tag, x_name: str, g_name: str, dots=(),
                          expect: int | None = None, then=()) -> tuple | None:
        """Close evaluation ``tag``: vector ``g_name`` = this slice of the gradient at ``x_name``
        (``finish_gradient``, exactly the reference's arithmetic), then the vector operations
        ``then`` (ones that return nothing, e.g. the L-BFGS pair this point would make); returns
        the slice's share of the regulariser, its partial sums of the ``dots`` pairs taken
        afterwards (the line search's slope rides along instead of costing another round trip)
        and the portions it holds (``accumulate``). ``expect``: the batch's portion count; while
        the shard holds fewer, it returns None and stays open (a flush will bring the rest)."""
        ev = self._evaluation()
        if ev.tag != tag:
            raise RuntimeError(f"shard {self.index}: cannot finish evaluation {tag!r}, the open "
                               f"one is {ev.tag!r}")
        refused = sorted({name for name, *_ in then} - QUEUED_OPS)
        if refused:
            raise ValueError(f"shard {self.index}: finish_evaluation runs only operations that "
                             f"return nothing ({', '.join(sorted(QUEUED_OPS))}), got "
                             f"{', '.join(map(repr, refused))}")
        if expect is not None and len(ev.won) < expect:
            return None
        ev.tag = None
        reg = finish_gradient(ev.acc, self.vectors.get(x_name), ev.mask, ev.n, ev.l2,
                              self.vectors.buffer(g_name))
        for name, *args in then:
            getattr(self.vectors, name)(*args)
        return reg, self.vectors.dots(dots), ev.won

    def objective_stats(self) -> dict:
        """Sandblaster counters: slice reads by workers, contributions accepted and refused."""
        ev = self._evaluation()
        return {"shard": self.index, "reads": ev.reads, "accepted": ev.accepted,
                "refused": ev.refused, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}


QUEUED_OPS = frozenset({"zeros", "copy", "swap", "axpy", "scale", "mul", "combine"})
VECTOR_OPS = QUEUED_OPS | {"dot", "dots"}
EVALUATION_OPS = frozenset({"open_evaluation", "finish_evaluation"})


class ObjectiveSlice:
    """A shard's part of Sandblaster's batch objective: what finishing its slice of the gradient
    needs (the slice's L2 mask, the batch size ``n``, ``l2``), the float64 accumulator the
    workers' portion sums are added into, the open evaluation (``tag``, vector ``x``) and counters.
    """

    def __init__(self, mask, n: int, l2: float, acc):
        self.mask, self.n, self.l2, self.acc = mask, n, l2, acc
        self.tag, self.x, self.won = None, None, {}
        self.opened = None  # the newest tag opened: a read of a newer one came early
        self.reads = self.accepted = self.refused = 0
