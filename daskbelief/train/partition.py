"""Model-parallel partition plans: which block computes which units, owns which parameters, and
which unit states cross which block boundary. Pure code: no Dask, no arrays.

A plan is a list of *stages*, each a run of consecutive layers (vertical partitioning) split into
``parts`` blocks (horizontal partitioning); blocks are numbered stage by stage. Within a stage every
layer is cut into one *piece* per block:

* Locally connected layers are cut by output positions: bands along the first spatial axis (``k``
  parts) or a grid of rectangles (``(rows, cols)`` parts, 2-D layers only). A piece reads only the
  input "halo" its receptive fields touch (``nn.receptive_field``), and because ``W`` and ``b`` are
  position-major, its weights are a few contiguous runs of the flat vector (one per row of its
  rectangle).
* Dense layers are cut by *input rows*: ``W`` is ``(n_in, units)`` row-major, so the weights of a
  set of input units are contiguous, whereas those of a set of output units would be ``n_in``
  strided pieces (one parameter-server call each). A dense piece reads only the inputs its own
  block already holds, computes a partial pre-activation for every output unit, and the blocks
  exchange the partial sums of each other's output units (forward) and those units' deltas
  (backward): the same bytes as sending the inputs along for a square layer. Each piece also owns
  a slice of the output units (their bias, activation and deltas); the model's last layer gives all
  its units to the stage's first block, which computes the loss.

Everything is expressed in *boxes*: a box is a tuple of ``(start, stop)`` per axis of a layer's
output shape ``(*spatial, channels)`` (a dense layer's is ``(units,)``; layer 0 reads the model
input). A piece owns ``out_box`` and reads ``in_box``; a transfer carries the intersection of a
producer's ``out_box`` with a consumer's ``in_box`` when they sit on different blocks: each unit's
state crosses each boundary once per block that needs it, forward as activations, backward as
deltas.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral

from daskbelief.checks import check_integer
from daskbelief.nn.layers import receptive_field
from daskbelief.nn.model import model_difference
from daskbelief.ranges import Range, merge, split

Box = tuple[tuple[int, int], ...]
ITEMSIZE = 4  # float32: what crosses a boundary


# -- boxes -----------------------------------------------------------------------------------

def split_evenly(n: int, k: int, what: str) -> list[Range]:
    """``range(n)`` cut into ``k`` contiguous runs whose lengths differ by at most one."""
    if n < k:
        raise ValueError(f"{what} has {n} units along the split axis: cannot cut it into {k} "
                         "blocks (more blocks than units)")
    return split(n, k)


def whole(shape: Sequence[int]) -> Box:
    """The box covering every unit of ``shape``."""
    return tuple((0, s) for s in shape)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def box_size(box: Box | None) -> int:
    return 0 if box is None else math.prod(box_shape(box))


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes of the same space, or None when they do not meet."""
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return out if all(lo < hi for lo, hi in out) else None


def relative(box: Box, within: Box) -> tuple[slice, ...]:
    """Slices that pick ``box`` out of an array holding ``within`` (box lies inside within)."""
    return tuple(slice(a - w, b - w) for (a, b), (w, _) in zip(box, within))


def flat_ranges(shape: Sequence[int], box: Box) -> list[Range]:
    """The C-order flat indices of ``box`` within ``shape`` as merged contiguous runs.

    Trailing axes the box covers whole fold into one run, so a band of rows is a single range and
    a rectangle is one range per row.
    """
    shape = tuple(shape)
    d = len(shape)
    while d > 0 and box[d - 1] == (0, shape[d - 1]):
        d -= 1
    if d == 0:
        return [(0, math.prod(shape))]
    inner = math.prod(shape[d:])
    runs: list[Range] = []
    strides = [math.prod(shape[i + 1:d]) for i in range(d)]
    lo, hi = box[d - 1]
    outer = [range(a, b) for a, b in box[:d - 1]]
    for index in _product(outer):
        base = sum(i * s for i, s in zip(index, strides))
        run = ((base + lo) * inner, (base + hi) * inner)
        if runs and runs[-1][1] == run[0]:
            runs[-1] = (runs[-1][0], run[1])
        else:
            runs.append(run)
    return runs


def _product(ranges: list[range]):
    if not ranges:
        yield ()
        return
    for i in ranges[0]:
        for rest in _product(ranges[1:]):
            yield (i, *rest)


# -- plan ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """The part of one layer computed on one block.

    ``out_box``: the output units it computes (None: it only contributes partial sums, as the
    non-head pieces of a split last layer do). ``in_box``: the inputs it reads. ``ranges``: its
    parameters in the flat vector, in vector order (the block holds them concatenated).
    ``w_size`` is how many of those values are weights (the rest are biases).
    """

    layer: int
    block: int
    part: int
    out_box: Box | None
    in_box: Box
    ranges: tuple[Range, ...]
    w_size: int

    @property
    def n_params(self) -> int:
        return sum(b - a for a, b in self.ranges)


@dataclass(frozen=True)
class Transfer:
    """One message per minibatch from block ``src`` to block ``dst`` about layer ``layer``.

    ``kind`` "activation": the producer's outputs in ``box`` (of layer ``layer - 1``'s output space)
    go forward and their deltas come back. ``kind`` "partial": partial sums of the destination's
    output units ``box`` of dense layer ``layer`` go forward and those units' deltas come back.
    """

    layer: int
    kind: str
    src: int
    dst: int
    box: Box

    @property
    def values(self) -> int:
        """Values per example, each way."""
        return box_size(self.box)

    @property
    def boundary(self) -> str:
        return (f"layer {self.layer - 1} -> {self.layer}" if self.kind == "activation"
                else f"layer {self.layer} partial sums")


class Plan:
    """A model cut into blocks: pieces per layer, parameter ranges per block, transfers."""

    def __init__(self, model, stages: Sequence[tuple[int, int, tuple[int, ...]]], kind: str):
        self.model, self.kind = model, kind
        self.stages = [(a, b, tuple(g)) for a, b, g in stages]
        self.pieces: list[list[Piece]] = []
        first_block = 0
        for start, stop, grid in self.stages:
            parts = math.prod(grid)
            for layer in range(start, stop):
                self.pieces.append(self._cut(layer, start, grid, first_block))
            first_block += parts
        self.n_blocks = first_block
        self.head = self.pieces[-1][0].block
        self.transfers = self._transfers()

    # -- construction ---------------------------------------------------------------------
    def _space(self, layer: int) -> tuple[int, ...]:
        """Shape of the input of ``layer`` (the model input for layer 0)."""
        return self.model.input_shape if layer == 0 else self.model.layers[layer - 1].output_shape

    def _cut(self, layer: int, stage_start: int, grid: tuple[int, ...], first_block: int) -> list[Piece]:
        lyr = self.model.layers[layer]
        name = f"layer {layer} ({lyr!r})"
        if lyr.partition_cut not in ("inputs", "positions"):
            raise ValueError(f"{name} declares no partition_cut: it cannot be cut into blocks")
        parts = math.prod(grid)
        last = layer == len(self.model.layers) - 1
        if lyr.partition_cut == "inputs":
            space = self._space(layer)
            if layer > stage_start:  # read what this block computed in the previous layer
                in_boxes = [p.out_box for p in self.pieces[layer - 1]]
            else:
                in_boxes = [((a, b), *whole(space[1:]))
                            for a, b in split_evenly(space[0], parts, f"the input of {name}")]
            units = ([(0, lyr.units)] + [None] * (parts - 1) if last
                     else split_evenly(lyr.units, parts, name))
            out_boxes = [None if u is None else (u,) for u in units]
        else:
            if last and parts > 1:
                raise ValueError(f"{name} is the output layer: the loss needs it whole on one "
                                 "block; end the model with a Dense layer or give the last layer "
                                 "a stage of its own")
            out_boxes = self._position_boxes(lyr, grid, name)
            in_boxes = [self._halo(lyr, box) for box in out_boxes]
        spec = {s.name: s for s in self.model.layout}
        W, b = spec[f"{layer}.W"], spec[f"{layer}.b"]
        pieces = []
        for part, (out_box, in_box) in enumerate(zip(out_boxes, in_boxes)):
            if lyr.partition_cut == "inputs":
                w = [(W.offset + a * lyr.units, W.offset + c * lyr.units)
                     for a, c in flat_ranges(self._space(layer), in_box)]
                bias = [] if out_box is None else [(b.offset + out_box[0][0], b.offset + out_box[0][1])]
            else:
                spatial = out_box[:-1]
                w = [(W.offset + a, W.offset + c)
                     for a, c in flat_ranges(W.shape, (*spatial, *whole(W.shape[len(spatial):])))]
                bias = [(b.offset + a, b.offset + c) for a, c in flat_ranges(b.shape, out_box)]
            pieces.append(Piece(layer, first_block + part, part, out_box, in_box,
                                tuple(merge(w) + merge(bias)), sum(c - a for a, c in w)))
        return pieces

    @staticmethod
    def _position_boxes(lyr, grid: tuple[int, ...], name: str) -> list[Box]:
        out = lyr.output_shape  # (*spatial, filters)
        if len(grid) > len(out) - 1:
            raise ValueError(f"a {grid[0]}x{grid[1]} grid cuts 2-D images, but {name} has "
                             f"{len(out) - 1} spatial axis: use a band split (k=...) for it")
        cuts = [split_evenly(out[axis], g, f"{name} (output axis {axis})")
                for axis, g in enumerate(grid)]
        rest = whole(out[len(grid):])
        return [(*combo, *rest) for combo in _product([list(c) for c in cuts])]

    @staticmethod
    def _halo(lyr, out_box: Box) -> Box:
        spatial = [receptive_field(a, b, k, s)
                   for (a, b), k, s in zip(out_box[:-1], lyr.kernel_size, lyr.strides)]
        return (*spatial, (0, lyr.input_shape[-1]))

    def _transfers(self) -> list[Transfer]:
        out = []
        for layer in range(len(self.pieces)):
            if self.model.layers[layer].partition_cut == "inputs":
                out += [Transfer(layer, "partial", a.block, b.block, b.out_box)
                        for a in self.pieces[layer] for b in self.pieces[layer]
                        if a.block != b.block and b.out_box is not None]
            if layer == 0:
                continue
            for c in self.pieces[layer]:
                for p in self.pieces[layer - 1]:
                    box = intersect(p.out_box, c.in_box)
                    if box is not None and p.block != c.block:
                        out.append(Transfer(layer, "activation", p.block, c.block, box))
        return out

    # -- description ----------------------------------------------------------------------
    def block_pieces(self, block: int) -> list[Piece]:
        """The pieces block ``block`` computes, in layer order."""
        return [p for layer in self.pieces for p in layer if p.block == block]

    def block_ranges(self, block: int) -> list[Range]:
        """The block's parameters as merged (start, stop) ranges into the flat vector."""
        return merge([r for p in self.block_pieces(block) for r in p.ranges])

    def block_units(self, block: int) -> int:
        return sum(box_size(p.out_box) for p in self.block_pieces(block))

    def input_values(self, block: int) -> int:
        """Input values per example the replica sends this block (its layer-0 piece's halo)."""
        return sum(box_size(p.in_box) for p in self.pieces[0] if p.block == block)

    def input_blocks(self) -> list[int]:
        """The blocks whose layer-0 piece reads the model's input."""
        return [p.block for p in self.pieces[0]]

    def input_block(self) -> int:
        """The block the replica sends the most input values (the first such): a replica placed
        on its worker hands it that share of every batch without crossing the network."""
        return max(range(self.n_blocks), key=self.input_values)

    def boundaries(self) -> list[dict]:
        """Per boundary: messages and bytes per example crossing it, each way."""
        rows: dict[str, dict] = {}
        for t in self.transfers:
            row = rows.setdefault(t.boundary, {"boundary": t.boundary, "messages": 0,
                                               "bytes_per_example": 0})
            row["messages"] += 1
            row["bytes_per_example"] += t.values * ITEMSIZE
        return list(rows.values())

    def bytes_per_example(self) -> int:
        """Bytes crossing block boundaries per example, forward and backward together."""
        return 2 * ITEMSIZE * sum(t.values for t in self.transfers)

    def summary(self) -> dict:
        """JSON-able description: blocks (layers, units, params, ranges) and boundaries."""
        return {"kind": self.kind, "blocks": self.n_blocks, "head": self.head,
                "stages": [{"layers": [a, b], "grid": list(g)} for a, b, g in self.stages],
                "per_block": [{"block": k, "layers": [p.layer for p in self.block_pieces(k)],
                               "units": self.block_units(k),
                               "params": sum(p.n_params for p in self.block_pieces(k)),
                               "ranges": len(self.block_ranges(k))}
                              for k in range(self.n_blocks)],
                "boundaries": self.boundaries(),
                "bytes_per_example": self.bytes_per_example()}

    def describe(self) -> str:
        s = self.summary()
        rows = [f"Plan({self.kind}: {self.n_blocks} blocks, loss on block {self.head})",
                f"  {'block':>5} {'layers':<12} {'units':>10} {'params':>12} {'ranges':>7}"]
        for b in s["per_block"]:
            rows.append(f"  {b['block']:>5} {','.join(map(str, b['layers'])):<12} "
                        f"{b['units']:>10,} {b['params']:>12,} {b['ranges']:>7}")
        for b in s["boundaries"]:
            rows.append(f"  {b['boundary']:<26} {b['messages']:>3} messages "
                        f"{b['bytes_per_example']:>10,} B/example each way")
        rows.append(f"  crossing boundaries: {s['bytes_per_example']:,} B/example (both ways)")
        return "\n".join(rows)

    __repr__ = describe


# -- constructors ----------------------------------------------------------------------------

def _count(value, what: str) -> int:
    return check_integer(what, value, 1)


def _grid(parts) -> tuple[int, ...]:
    if isinstance(parts, Integral) and not isinstance(parts, bool):
        return (_count(parts, "k (blocks per stage)"),)
    if isinstance(parts, Sequence) and len(parts) == 2:
        return (_count(parts[0], "grid rows"), _count(parts[1], "grid cols"))
    raise ValueError(f"a stage's parts are an int k or (rows, cols), got {parts!r}")


def stages(model, spec: Sequence[tuple[int, object]], kind: str = "stages") -> Plan:
    """A plan from ``[(n_layers, parts), ...]``: consecutive runs of layers, each cut into
    ``parts`` blocks (an int k: bands / unit ranges; ``(rows, cols)``: a grid of rectangles)."""
    if not spec:
        raise ValueError("a partition needs at least one stage")
    bounds, start = [], 0
    for n, parts in spec:
        n = _count(n, "a stage's layer count")
        bounds.append((start, start + n, _grid(parts)))
        start += n
    if start != len(model.layers):
        raise ValueError(f"the stages cover {start} layers but the model has {len(model.layers)}")
    return Plan(model, bounds, kind)


def vertical(model, k: int) -> Plan:
    """``k`` runs of consecutive layers, balanced by training FLOPs: activations go forward across
    each cut, deltas back."""
    k = _count(k, "k")
    costs = [layer.flops_per_example() for layer in model.layers]
    if k > len(costs):
        raise ValueError(f"cannot cut {len(costs)} layers into {k} vertical blocks "
                         "(more blocks than layers)")
    return stages(model, [(n, 1) for n in _balanced_runs(costs, k)], "vertical")


def _balanced_runs(costs: list[int], k: int) -> list[int]:
    """Lengths of ``k`` consecutive non-empty runs of ``costs`` minimising the largest run sum."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    best = {(0, 0): (0, [])}  # (layers used, runs) -> (max run cost, lengths)
    for runs in range(1, k + 1):
        for used in range(runs, n - (k - runs) + 1):
            options = [(max(best[(s, runs - 1)][0], prefix[used] - prefix[s]),
                        best[(s, runs - 1)][1] + [used - s])
                       for s in range(runs - 1, used) if (s, runs - 1) in best]
            best[(used, runs)] = min(options)
    return best[(n, k)][1]


def horizontal(model, k: int) -> Plan:
    """Every layer cut into ``k`` blocks: locally connected layers into bands of output positions
    along their first spatial axis, dense layers by input rows."""
    return stages(model, [(len(model.layers), _count(k, "k"))], "horizontal")


def grid(model, rows: int, cols: int) -> Plan:
    """Every layer cut into ``rows * cols`` blocks: locally connected 2-D layers into a grid of
    rectangles of output positions, dense layers by input rows."""
    return stages(model, [(len(model.layers), (_count(rows, "rows"), _count(cols, "cols")))], "grid")


def from_config(model, spec: Mapping) -> Plan:
    """A plan from a pipeline table: ``{kind="vertical", k=2}``, ``{kind="horizontal", k=2}``,
    ``{kind="grid", rows=2, cols=2}`` or ``{kind="stages", stages=[{layers=2, rows=2, cols=2},
    {layers=1}]}`` (a stage takes ``k`` or ``rows``/``cols``, default one block)."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"partition must be a table, got {spec!r}")
    kinds = {"vertical": {"k"}, "horizontal": {"k"}, "grid": {"rows", "cols"}, "stages": {"stages"}}
    kind = spec.get("kind")
    if kind not in kinds:
        raise ValueError(f"partition.kind must be one of {', '.join(kinds)}, got {kind!r}")
    keys = set(spec) - {"kind"}
    if keys != kinds[kind]:
        raise ValueError(f"a {kind} partition takes the keys {sorted(kinds[kind])}, got {sorted(keys)}")
    if kind == "vertical":
        return vertical(model, spec["k"])
    if kind == "horizontal":
        return horizontal(model, spec["k"])
    if kind == "grid":
        return grid(model, spec["rows"], spec["cols"])
    return stages(model, [_stage_from_config(s) for s in spec["stages"]])


def _stage_from_config(stage) -> tuple[int, object]:
    if not isinstance(stage, Mapping) or "layers" not in stage or set(stage) - {"layers", "k", "rows", "cols"}:
        raise ValueError(f"a stage is a table with layers and optionally k or rows/cols, got {stage!r}")
    if "rows" in stage or "cols" in stage:
        return stage["layers"], (stage.get("rows", 1), stage.get("cols", 1))
    return stage["layers"], stage.get("k", 1)


def as_plan(model, partition) -> Plan | None:
    """``partition`` (a ``Plan``, a pipeline table, or None) as a ``Plan`` of ``model``; a plan
    made for another model is refused, naming the difference."""
    if partition is None:
        return None
    if not isinstance(partition, Plan):
        return from_config(model, partition)
    if partition.model.to_dict() != model.to_dict():
        raise ValueError("the partition plan was made for another model: "
                         + model_difference(partition.model.to_dict(), model.to_dict(), ("plan", "model")))
    return partition
