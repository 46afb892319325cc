"""Partition plans (pure) and the partitioned arithmetic in one process, in float64: no Dask."""
from __future__ import annotations

import numpy as np
import pytest

from daskbelief.nn import Dense, LocallyConnected1D, LocallyConnected2D, Sequential
from daskbelief.nn.layers import receptive_field
from daskbelief.train import partition as P
from daskbelief.train.block import Staged, _LocalBlock, loss_and_grad, split_inputs
from daskbelief.train.partition import box_shape
from daskbelief.train.pieces import LocallyConnectedPiece, parts, reading, runs


def small_image_model():
    """(8,8,1) -> LC2D 2@3x3 -> (6,6,2) -> LC2D 2@3x3 -> (4,4,2) -> Dense 3: small enough to count
    every unit by hand. Layout: 0.W [0,648) 0.b [648,720) 1.W [720,1296) 1.b [1296,1328)
    2.W [1328,1424) 2.b [1424,1427)."""
    return Sequential((8, 8, 1), [LocallyConnected2D(2, 3, activation="relu"),
                                  LocallyConnected2D(2, 3, activation="relu"), Dense(3)])


def test_boxes_and_flat_ranges():
    assert P.split_evenly(10, 3, "x") == [(0, 4), (4, 7), (7, 10)]
    assert P.intersect(((0, 4), (0, 6)), ((3, 8), (2, 3))) == ((3, 4), (2, 3))
    assert P.intersect(((0, 3),), ((3, 5),)) is None
    # A band of rows is one run; a rectangle is one run per row; whole trailing axes fold in.
    assert P.flat_ranges((4, 5, 2), ((1, 3), (0, 5), (0, 2))) == [(10, 30)]
    assert P.flat_ranges((4, 5, 2), ((1, 3), (2, 4), (0, 2))) == [(14, 18), (24, 28)]
    assert P.flat_ranges((6,), ((2, 5),)) == [(2, 5)]
    assert P.merge([(0, 2), (2, 5), (7, 9)]) == [(0, 5), (7, 9)]


def test_vertical_plan_counted_by_hand():
    plan = P.vertical(small_image_model(), 2)
    # FLOPs per layer 1296, 1152, 192: the balanced cut is [0] | [1, 2].
    s = plan.summary()
    assert [b["layers"] for b in s["per_block"]] == [[0], [1, 2]]
    assert [b["units"] for b in s["per_block"]] == [6 * 6 * 2, 4 * 4 * 2 + 3]
    assert [b["params"] for b in s["per_block"]] == [720, 707]
    assert plan.block_ranges(0) == [(0, 720)] and plan.block_ranges(1) == [(720, 1427)]
    # All 72 units of layer 0 cross to block 1, once; their deltas come back.
    assert s["boundaries"] == [{"boundary": "layer 0 -> 1", "messages": 1, "bytes_per_example": 288}]
    assert plan.bytes_per_example() == 2 * 288
    assert plan.head == 1


def test_horizontal_plan_counted_by_hand():
    plan = P.horizontal(small_image_model(), 2)
    s = plan.summary()
    # Layer 0 rows 0:3 | 3:6 (36 units each), layer 1 rows 0:2 | 2:4 (16 each); the dense layer's
    # 3 units sit on block 0 (the loss), block 1 only adds its partial sums.
    assert [b["units"] for b in s["per_block"]] == [36 + 16 + 3, 36 + 16]
    assert [b["params"] for b in s["per_block"]] == [324 + 36 + 288 + 16 + 48 + 3, 324 + 36 + 288 + 16 + 48]
    assert plan.block_ranges(0) == [(0, 324), (648, 684), (720, 1008), (1296, 1312), (1328, 1376),
                                    (1424, 1427)]
    assert plan.block_ranges(1) == [(324, 648), (684, 720), (1008, 1296), (1312, 1328), (1376, 1424)]
    # Layer 1 rows 0:2 read layer-0 rows 0:4: row 3 (6 columns x 2 channels) comes from block 1;
    # rows 2:4 read rows 2:6, so row 2 goes the other way. Then 3 partial sums to the head.
    assert s["boundaries"] == [
        {"boundary": "layer 0 -> 1", "messages": 2, "bytes_per_example": 2 * 12 * 4},
        {"boundary": "layer 2 partial sums", "messages": 1, "bytes_per_example": 3 * 4}]
    assert plan.input_values(0) == 5 * 8 and plan.input_values(1) == 5 * 8  # input rows 0:5, 3:8
    assert plan.input_block() == 0  # a tie: the first


def test_the_input_block_is_the_one_sent_the_most_of_each_batch():
    """Where a model-parallel replica is placed: beside the block it sends the most input to,
    counted here from the slices ``split_inputs`` really cuts."""
    X = np.zeros((3, 8, 8, 1))
    for plan in [P.vertical(small_image_model(), 2), P.horizontal(small_image_model(), 2),
                 P.grid(small_image_model(), 2, 2), P.horizontal(small_image_model(), 3),
                 P.stages(small_image_model(), [(1, 1), (2, (2, 1))])]:
        sent = {k: x.size for k, x in split_inputs(plan, X).items()}
        most = max(sent.values())
        assert plan.input_block() == min(k for k, v in sent.items() if v == most), plan.summary()


def test_grid_plan_counted_by_hand():
    plan = P.grid(small_image_model(), 2, 2)
    s = plan.summary()
    assert plan.n_blocks == 4
    assert [b["units"] for b in s["per_block"]] == [18 + 8 + 3, 26, 26, 26]
    # Block 0's layer-1 piece (rows 0:2, cols 0:2) reads layer-0 rows 0:4 x cols 0:4: it owns
    # 3x3 of them and receives 3 from its right, 3 from below and 1 from the diagonal (x 2 channels).
    into0 = [t for t in plan.transfers if t.kind == "activation" and t.dst == 0]
    assert sorted((t.src, t.values) for t in into0) == [(1, 6), (2, 6), (3, 2)]
    assert s["boundaries"][0] == {"boundary": "layer 0 -> 1", "messages": 12, "bytes_per_example": 4 * 14 * 4}
    assert s["boundaries"][1] == {"boundary": "layer 2 partial sums", "messages": 3, "bytes_per_example": 3 * 3 * 4}
    # Each block's layer-0 weights are one run per output row of its rectangle.
    assert plan.pieces[0][1].ranges[:3] == ((54, 108), (162, 216), (270, 324))
    covered = sorted(r for k in range(4) for r in plan.block_ranges(k))
    assert P.merge(covered) == [(0, plan.model.size)]  # every parameter owned exactly once


def test_stages_combine_a_grid_with_a_vertical_cut():
    plan = P.stages(small_image_model(), [(2, (2, 2)), (1, 1)])
    assert plan.n_blocks == 5 and plan.head == 4
    last = [b for b in plan.boundaries() if b["boundary"] == "layer 1 -> 2"]
    assert last == [{"boundary": "layer 1 -> 2", "messages": 4, "bytes_per_example": 32 * 4}]
    assert P.from_config(small_image_model(), {"kind": "stages", "stages": [
        {"layers": 2, "rows": 2, "cols": 2}, {"layers": 1}]}).summary() == plan.summary()


def test_balanced_vertical_runs():
    assert P._balanced_runs([5, 1, 1, 1, 5], 2) == [2, 3]
    assert P._balanced_runs([1, 1, 1, 1], 4) == [1, 1, 1, 1]
    assert P._balanced_runs([10, 1, 1], 2) == [1, 2]


@pytest.mark.parametrize("make, message", [
    (lambda m: P.horizontal(m, 0), "k must be an integer >= 1"),
    (lambda m: P.horizontal(m, 5), "more blocks than units"),       # layer 1 has 4 output rows
    (lambda m: P.grid(m, 2, 7), "more blocks than units"),
    (lambda m: P.vertical(m, 4), "more blocks than layers"),
    (lambda m: P.stages(m, [(1, 2), (1, 1)]), "cover 2 layers but the model has 3"),
    (lambda m: P.from_config(m, {"kind": "diagonal", "k": 2}), "partition.kind must be one of"),
    (lambda m: P.from_config(m, {"kind": "grid", "rows": 2}), "takes the keys"),
])
def test_plans_that_do_not_fit_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make(small_image_model())


def test_grid_needs_two_dimensional_layers_and_a_whole_output_layer():
    seq = Sequential((10, 3), [LocallyConnected1D(4, 3), Dense(2)])
    with pytest.raises(ValueError, match="grid cuts 2-D images"):
        P.grid(seq, 2, 2)
    lc_last = Sequential((8, 8, 1), [LocallyConnected2D(2, 3)], loss="mse")
    with pytest.raises(ValueError, match="output layer"):
        P.horizontal(lc_last, 2)


def models_and_plans():
    image = Sequential((9, 8, 2), [LocallyConnected2D(3, 3, activation="relu"),
                                   LocallyConnected2D(2, (3, 2), strides=(2, 1), activation="tanh"),
                                   Dense(5, "sigmoid"), Dense(4)], l2=1e-3)
    mlp = Sequential((12,), [Dense(10, "relu"), Dense(9, "tanh"), Dense(3)], loss="mse", l2=1e-2)
    seq = Sequential((10, 3), [LocallyConnected1D(4, 3, activation="relu"),
                               LocallyConnected1D(2, 2, strides=2), Dense(3)])
    rng = np.random.default_rng(0)
    cases = [
        (image, rng.standard_normal((7, 9, 8, 2)), rng.integers(0, 4, 7),
         [P.vertical(image, 1), P.vertical(image, 4), P.horizontal(image, 3), P.grid(image, 2, 2),
          P.stages(image, [(2, (2, 2)), (2, 2)]), P.stages(image, [(1, 1), (1, 3), (2, 1)])]),
        (mlp, rng.standard_normal((6, 12)), rng.standard_normal((6, 3)),
         [P.vertical(mlp, 3), P.horizontal(mlp, 3), P.stages(mlp, [(1, 2), (2, 3)])]),
        (seq, rng.standard_normal((6, 10, 3)), rng.integers(0, 3, 6),
         [P.horizontal(seq, 4), P.vertical(seq, 2)]),
    ]
    return [(m, X, y, plan) for m, X, y, plans in cases for plan in plans]


@pytest.mark.parametrize("model, X, y, plan", models_and_plans(),
                         ids=lambda v: getattr(v, "kind", None) and f"{v.kind}-{v.n_blocks}")
def test_partitioned_arithmetic_equals_the_whole_network_in_float64(model, X, y, plan):
    params = model.init(1).astype(np.float64)
    expect_loss, expect_grad = model.loss_and_grad(params, X, y)
    loss, grad = loss_and_grad(plan, params, X, y)
    assert loss == pytest.approx(expect_loss, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(grad, expect_grad, rtol=1e-10, atol=1e-12)
    s_loss, s_grad = loss_and_grad(plan, params, X, y, reduction="sum", regularize=False)
    e_loss, e_grad = model.loss_and_grad(params, X, y, reduction="sum", regularize=False)
    assert s_loss == pytest.approx(e_loss, rel=1e-12)
    np.testing.assert_allclose(s_grad, e_grad, rtol=1e-10, atol=1e-12)


def test_the_outputs_that_read_an_input_range():
    """``pieces.reading`` against every output position's receptive field, counted one by one."""
    for n_in in range(1, 12):
        for kernel in range(1, n_in + 1):
            for stride in range(1, 4):
                n_out = (n_in - kernel) // stride + 1
                for lo in range(n_in):
                    for hi in range(lo + 1, n_in + 1):
                        expect = [i for i in range(n_out)
                                  if i * stride < hi and i * stride + kernel > lo]
                        got = list(range(n_out))[reading(lo, hi, kernel, stride, n_out)]
                        assert got == expect, (n_in, kernel, stride, lo, hi)


def test_runs_and_parts_of_a_mask():
    rng = np.random.default_rng(3)
    for _ in range(200):
        mask = rng.random(tuple(rng.integers(1, 6, rng.integers(1, 3)))) < rng.random()
        flat = mask.ravel()
        assert [i for a, b in runs(mask) for i in range(a, b)] == list(np.flatnonzero(flat))
        assert all(b < c for (_, b), (c, _) in zip(runs(mask), runs(mask)[1:]))  # maximal runs
        split = parts(mask)
        covered = sorted(i for part in split for a, b in part for i in range(a, b))
        assert covered == list(range(flat.size))  # every position once
        if 0 < flat.sum() < flat.size:
            assert split[0] == runs(mask)  # what neighbours need comes first


@pytest.mark.parametrize("plan", [P.horizontal(small_image_model(), 2), P.horizontal(small_image_model(), 3),
                                  P.grid(small_image_model(), 2, 2)], ids=lambda p: f"{p.kind}-{p.n_blocks}")
def test_a_piece_computes_first_what_its_neighbours_wait_for(plan):
    """Forward's first part is exactly the outputs other blocks read; backward's, exactly the
    outputs whose receptive fields (``receptive_field``) meet inputs other blocks sent."""
    model = plan.model
    for k in range(plan.n_blocks):
        block = _LocalBlock(plan, k, np.zeros(sum(b - a for a, b in plan.block_ranges(k)), np.float32))
        for op in block.ops:
            if not isinstance(op, LocallyConnectedPiece):
                continue
            layer, (out_box, in_box) = model.layers[op.piece.layer], (op.piece.out_box, op.piece.in_box)
            cells = list(np.ndindex(*box_shape(out_box)[:-1]))
            read = {c for c in cells if any(all(lo <= o + c_ < hi for c_, (o, _), (lo, hi) in zip(c, out_box, box))
                                             for _, box in op.act_to)}
            fields = {c: [receptive_field(o + i, o + i + 1, kk, s)
                          for i, (o, _), kk, s in zip(c, out_box, layer.kernel_size, layer.strides)]
                      for c in cells}
            meet = {c for c in cells if any(all(f0 < hi and f1 > lo for (f0, f1), (lo, hi) in zip(fields[c], box))
                                             for _, box in op.act_from)}
            for parts_, first in [(op.forward_parts, read), (op.backward_parts, meet)]:
                flat = [cells[i] for a, b in parts_[0] for i in range(a, b)]
                assert set(flat) == (first or set(cells)), (k, op.piece.layer)
                assert len(parts_) == (2 if 0 < len(first) < len(cells) else 1)
        assert any(op.act_to or op.act_from for op in block.ops)  # the plans do exchange halos


def test_an_input_sent_ahead_supersedes_the_earlier_ones_of_its_sender_only():
    staged = Staged("a", 5)
    assert staged.key == ("input", "a", 5)
    assert staged.supersedes(("input", "a", 4)) and staged.supersedes(("input", "b", 9))
    assert not staged.supersedes(("input", "a", 5)) and not staged.supersedes(("input", "a", 6))
    assert not staged.supersedes((("input", "a", 1), "act", 1, 0))  # a step's message
