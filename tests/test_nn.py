"""The network core against independent oracles: finite differences, naive loops, sklearn."""
from __future__ import annotations

import json
import math
import pickle
import threading

import numpy as np
import pytest
from sklearn.metrics import log_loss

from daskbelief.backend import gpu_available
from daskbelief.nn import layers
from daskbelief.nn import (Dense, LocallyConnected1D, LocallyConnected2D, ParamSpec, Sequential,
                           layer_from_dict, patches, receptive_field)

EPS = 1e-6


def data(model: Sequential, n: int = 5, seed: int = 1):
    """Random inputs and valid targets for ``model``."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, *model.input_shape))
    if model.loss == "mse":
        return X, rng.standard_normal((n, model.n_outputs))
    return X, rng.integers(0, model.n_outputs, n)


def perturbed_params(model: Sequential, seed: int = 0) -> np.ndarray:
    """float64 parameters with non-zero biases, so every term of the gradient is exercised."""
    p = model.init(seed).astype(np.float64)
    return p + 0.1 * np.random.default_rng(seed + 7).standard_normal(p.size)


def finite_differences(model, p, X, y, **kw) -> np.ndarray:
    g = np.empty_like(p)
    for i in range(p.size):
        old = p[i]
        p[i] = old + EPS
        up, _ = model.loss_and_grad(p, X, y, **kw)
        p[i] = old - EPS
        down, _ = model.loss_and_grad(p, X, y, **kw)
        p[i] = old
        g[i] = (up - down) / (2 * EPS)
    return g


def assert_gradient_matches(model, **kw):
    X, y = data(model)
    p = perturbed_params(model)
    _, g = model.loss_and_grad(p, X, y, **kw)
    assert g.dtype == np.float64
    np.testing.assert_allclose(g, finite_differences(model, p, X, y, **kw), rtol=1e-5, atol=1e-8)


# -- gradients ------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "linear"])
@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "mse"])
def test_dense_gradient(activation, loss):
    model = Sequential((6,), [Dense(5, activation), Dense(4, activation), Dense(3)], loss=loss)
    assert_gradient_matches(model)


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "linear"])
def test_activation_on_the_output_layer_gradient(activation):
    # The loss must not overwrite the last layer's output before that layer's backward uses it.
    assert_gradient_matches(Sequential((4,), [Dense(3, activation)], loss="mse"))
    assert_gradient_matches(Sequential((4,), [Dense(3, activation)]))


def test_locally_connected_1d_gradient():
    model = Sequential((11, 2), [LocallyConnected1D(3, 3, 2, "relu"),
                                 LocallyConnected1D(2, 2, 1, "sigmoid"), Dense(3)], l2=0.01)
    assert_gradient_matches(model)


def test_locally_connected_2d_gradient_strided_non_square():
    model = Sequential((7, 6, 2), [LocallyConnected2D(3, (3, 2), (2, 1), "relu"),
                                   LocallyConnected2D(2, (2, 2), (1, 2), "tanh"),
                                   Dense(3, "sigmoid"), Dense(3)], l2=0.05)
    assert_gradient_matches(model)


@pytest.mark.parametrize("cache_bytes", [1, 3 * (2 * 12 + 3) * 5 * 8])
def test_locally_connected_blocks_of_any_size_give_the_same_gradient(monkeypatch, cache_bytes):
    """One position per block, and blocks of 3 that straddle rows of 6 positions (layer 0's
    per-position bytes are (2 K + F) n itemsize = (2*12 + 3)*5*8): the same gradient as one
    block of everything, and still the finite differences'."""
    model = Sequential((7, 6, 2), [LocallyConnected2D(3, (3, 2), (2, 1), "relu"),
                                   LocallyConnected2D(2, (2, 2), (1, 2), "tanh"),
                                   Dense(3, "sigmoid"), Dense(3)], l2=0.05)
    X, y = data(model)
    p = perturbed_params(model)
    monkeypatch.setattr(layers, "CACHE_BYTES", 1 << 40)
    assert layers.block_positions(12, 3, 5, 8) >= model.layers[0].positions
    whole = model.loss_and_grad(p, X, y)
    monkeypatch.setattr(layers, "CACHE_BYTES", cache_bytes)
    assert layers.block_positions(12, 3, 5, 8) == (1 if cache_bytes == 1 else 3)
    loss, g = Sequential.from_dict(model.to_dict()).loss_and_grad(p, X, y)
    assert loss == pytest.approx(whole[0], rel=1e-12)
    np.testing.assert_allclose(g, whole[1], rtol=1e-10, atol=1e-14)
    assert_gradient_matches(model)


def test_locally_connected_output_layer_with_mse_gradient():
    model = Sequential((6, 5, 1), [LocallyConnected2D(2, (2, 3), (2, 1), "tanh")], loss="mse")
    assert model.n_outputs == 3 * 3 * 2
    assert_gradient_matches(model)


@pytest.mark.parametrize("kw", [{"reduction": "sum"}, {"regularize": False},
                                {"reduction": "sum", "regularize": False}])
def test_gradient_for_every_reduction(kw):
    model = Sequential((3, 4, 2), [LocallyConnected2D(2, 2, 1, "relu"), Dense(3)], l2=0.1)
    assert_gradient_matches(model, **kw)


def test_layer_input_gradient_of_a_first_layer():
    # A model never asks its first layer for dx; model parallelism does.
    for layer, shape in ((LocallyConnected2D(2, (2, 3), (2, 2), "tanh"), (5, 7, 3)),
                         (Dense(4, "sigmoid"), (2, 3))):
        layer.build(shape)
        rng = np.random.default_rng(3)
        p = {k: rng.standard_normal(s) for k, s in layer.param_shapes().items()}
        x = rng.standard_normal((3, *shape))
        r = rng.standard_normal((3, *layer.output_shape))

        def objective(x, layer=layer, p=p, r=r):
            return float((layer.forward(p, x)[0] * r).sum())

        out, cache = layer.forward(p, x)
        grads = {k: np.empty_like(v) for k, v in p.items()}
        dx = layer.backward(p, cache, r.copy(), grads)
        num = np.empty_like(x)
        for i in np.ndindex(x.shape):
            x[i] += EPS
            up = objective(x)
            x[i] -= 2 * EPS
            down = objective(x)
            x[i] += EPS
            num[i] = (up - down) / (2 * EPS)
        np.testing.assert_allclose(dx, num, rtol=1e-5, atol=1e-8)
        assert layer.backward(p, layer.forward(p, x)[1], r.copy(), grads, input_grad=False) is None


# -- forward against naive loops -------------------------------------------------------------

def test_locally_connected_2d_forward_matches_loops():
    layer = LocallyConnected2D(4, (3, 2), (2, 3), "relu")
    layer.build((9, 8, 3))
    rng = np.random.default_rng(0)
    p = {k: rng.standard_normal(s) for k, s in layer.param_shapes().items()}
    x = rng.standard_normal((5, 9, 8, 3))
    out, _ = layer.forward(p, x)
    oh, ow = layer.out_spatial
    assert (oh, ow) == (4, 3) and out.shape == (5, 4, 3, 4)
    for i in range(oh):
        for j in range(ow):
            patch = x[:, 2 * i:2 * i + 3, 3 * j:3 * j + 2, :].reshape(5, -1)  # (kh, kw, C) order
            want = np.maximum(patch @ p["W"][i, j] + p["b"][i, j], 0)
            np.testing.assert_allclose(out[:, i, j], want, rtol=1e-12)


def test_locally_connected_1d_forward_matches_loops():
    layer = LocallyConnected1D(2, 3, 2, "tanh")
    layer.build((9, 2))
    rng = np.random.default_rng(1)
    p = {k: rng.standard_normal(s) for k, s in layer.param_shapes().items()}
    x = rng.standard_normal((4, 9, 2))
    out, _ = layer.forward(p, x)
    for i in range(layer.out_spatial[0]):
        want = np.tanh(x[:, 2 * i:2 * i + 3].reshape(4, -1) @ p["W"][i] + p["b"][i])
        np.testing.assert_allclose(out[:, i], want, rtol=1e-12)


def test_dense_forward_flattens_its_input():
    layer = Dense(3, "sigmoid")
    assert layer.build((2, 2)) == (3,)
    rng = np.random.default_rng(2)
    p = {k: rng.standard_normal(s) for k, s in layer.param_shapes().items()}
    x = rng.standard_normal((5, 2, 2))
    out, _ = layer.forward(p, x)
    np.testing.assert_allclose(out, 1 / (1 + np.exp(-(x.reshape(5, 4) @ p["W"] + p["b"]))))


def test_patches_and_receptive_field_compute_an_output_block_from_its_halo():
    x = np.random.default_rng(0).standard_normal((2, 10, 9, 3))
    view = patches(x, (3, 2), (2, 3))
    assert view.shape == (2, 4, 3, 3, 2, 3) and np.shares_memory(view, x)
    np.testing.assert_array_equal(view[:, 1, 2], x[:, 2:5, 6:8])
    layer = LocallyConnected2D(2, (3, 2), (2, 3), "relu")
    layer.build(x.shape[1:])
    p = {k: np.random.default_rng(1).standard_normal(s) for k, s in layer.param_shapes().items()}
    full, _ = layer.forward(p, x)
    # Output rows [1, 3) need input rows receptive_field(1, 3, 3, 2) = [2, 7).
    lo, hi = receptive_field(1, 3, 3, 2)
    assert (lo, hi) == (2, 7)
    part = LocallyConnected2D(2, (3, 2), (2, 3), "relu")
    part.build((hi - lo, 9, 3))
    block, _ = part.forward({k: v[1:3] for k, v in p.items()}, x[:, lo:hi])
    np.testing.assert_allclose(block, full[:, 1:3])


# -- parameters and layout -------------------------------------------------------------------

def image_model(**kw) -> Sequential:
    return Sequential((8, 7, 2), [LocallyConnected2D(3, (3, 2), (2, 1), "relu"),
                                  Dense(6, "tanh"), Dense(4)], **kw)


def test_layout_is_contiguous_named_and_in_layer_order():
    model = image_model()
    names = [s.name for s in model.layout]
    assert names == ["0.W", "0.b", "1.W", "1.b", "2.W", "2.b"]
    assert model.layout[0] == ParamSpec("0.W", 0, (3, 6, 12, 3))
    offset = 0
    for spec in model.layout:
        assert spec.offset == offset
        offset += spec.size
    assert offset == model.size == 3 * 6 * (12 * 3 + 3) + (54 * 6 + 6) + (6 * 4 + 4)
    assert model.layer_ranges == [(0, 702), (702, 1032), (1032, 1060)]


def test_views_write_into_the_flat_vector():
    model = image_model()
    params = model.init(0)
    views = model.views(params)
    for layer_views, (start, stop) in zip(views, model.layer_ranges):
        for v in layer_views.values():
            assert np.shares_memory(v, params[start:stop])
    views[1]["b"][...] = 42
    spec = model.layout[3]
    assert np.all(params[spec.offset:spec.offset + spec.size] == 42)
    assert np.count_nonzero(params == 42) == spec.size


def test_decay_mask_covers_weights_not_biases():
    model = image_model()
    mask = model.decay_mask()
    assert mask.dtype == np.float32
    for spec in model.layout:
        want = 1.0 if spec.name.endswith(".W") else 0.0
        assert np.all(mask[spec.offset:spec.offset + spec.size] == want)


def test_init_is_deterministic_float32_and_scaled():
    model = Sequential((400,), [Dense(300, "relu"), Dense(200, "tanh")])
    a, b, c = model.init(3), model.init(3), model.init(4)
    assert a.dtype == np.float32 and a.shape == (model.size,)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    v = model.views(a)
    assert np.all(v[0]["b"] == 0) and np.all(v[1]["b"] == 0)
    assert abs(v[0]["W"].std() - math.sqrt(2 / 400)) < 0.03 * math.sqrt(2 / 400)  # He
    limit = math.sqrt(6 / 500)  # Glorot uniform
    assert v[1]["W"].max() <= limit and v[1]["W"].min() >= -limit
    assert abs(v[1]["W"].std() - limit / math.sqrt(3)) < 0.03 * limit


def test_each_layer_draws_from_its_own_stream():
    short = Sequential((5,), [Dense(4, "relu"), Dense(3)])
    longer = Sequential((5,), [Dense(4, "relu"), Dense(3), Dense(2)])
    np.testing.assert_array_equal(short.init(9), longer.init(9)[:short.size])
    twins = Sequential((4,), [Dense(4), Dense(4)])
    w = twins.views(twins.init(9))
    assert not np.array_equal(w[0]["W"], w[1]["W"])


@pytest.mark.parametrize("seed", [0, 5])
def test_any_range_of_the_initial_parameters_is_made_alone(monkeypatch, seed):
    """``init_range`` (how each shard of a model no process holds makes its slice) equals the
    slice of ``init``, for seeded random ranges crossing layers, biases and the runs of weights
    drawn from one stream (made small here so that a layer has many)."""
    from daskbelief.nn import model as model_module

    monkeypatch.setattr(model_module, "INIT_CHUNK", 1000)
    model = Sequential((6, 7, 3), [LocallyConnected2D(5, 3, activation="relu"), Dense(40, "tanh"),
                                   Dense(4)])
    whole = model.init(seed)
    rng = np.random.default_rng(seed)
    print(f"seed {seed}: {model.size} parameters")
    for start, stop in [(0, model.size), (0, 0), (model.size, model.size),
                        *(sorted(rng.integers(0, model.size + 1, 2)) for _ in range(50))]:
        np.testing.assert_array_equal(model.init_range(seed, start, stop), whole[start:stop])
    with pytest.raises(ValueError, match="not within"):
        model.init_range(seed, 0, model.size + 1)
    assert len(set(whole[:1000])) > 900 and not np.array_equal(whole[:1000], whole[1000:2000])


def test_dict_round_trip_through_json():
    model = Sequential((9, 2), [LocallyConnected1D(3, 3, 2, "sigmoid"), Dense(5, "relu"), Dense(2)],
                       loss="mse", l2=1e-3)
    d = json.loads(json.dumps(model.to_dict()))
    again = Sequential.from_dict(d)
    assert again.to_dict() == model.to_dict()
    assert again.layout == model.layout and again.layer_ranges == model.layer_ranges
    np.testing.assert_array_equal(again.init(5), model.init(5))
    assert again.loss == "mse" and again.l2 == 1e-3


def test_from_dict_accepts_a_config_style_dict():
    config = {"input_shape": [64],
              "layers": [{"type": "dense", "units": 64, "activation": "relu"},
                         {"type": "dense", "units": 10}],
              "loss": "softmax_cross_entropy", "l2": 1e-4}
    model = Sequential.from_dict(config)
    assert model.input_shape == (64,) and model.n_outputs == 10 and model.l2 == 1e-4
    assert model.size == 64 * 64 + 64 + 64 * 10 + 10
    image = Sequential.from_dict({"input_shape": [6, 6, 1], "layers": [
        {"type": "locally_connected_2d", "filters": 2, "kernel_size": 3, "activation": "relu"},
        {"type": "dense", "units": 3}]})
    assert image.layers[0].kernel_size == (3, 3) and image.layers[0].strides == (1, 1)
    assert image.loss == "softmax_cross_entropy" and image.l2 == 0.0


@pytest.mark.parametrize("d, match", [
    ({"input_shape": [4]}, "lacks"),
    ({"input_shape": [4], "layers": [{"type": "dense", "units": 2}], "optimizer": "sgd"}, "unknown"),
    ({"input_shape": [4], "layers": [{"type": "conv", "units": 2}]}, "unknown layer type"),
    ({"input_shape": [4], "layers": [{"type": "dense", "width": 2}]}, "bad arguments"),
    ({"input_shape": [4], "layers": [{"units": 2}]}, "'type'"),
    ({"input_shape": [4], "layers": []}, "at least one layer"),
    ({"input_shape": [0], "layers": [{"type": "dense", "units": 2}]}, "shape"),
    ([1, 2], "must be a dict"),
])
def test_bad_descriptions(d, match):
    with pytest.raises(ValueError, match=match):
        Sequential.from_dict(d)


def test_model_pickles_after_use():
    model = image_model(l2=0.01)
    X, y = data(model)
    p = model.init(0).astype(np.float64)
    before = model.loss_and_grad(p, X, y)
    again = pickle.loads(pickle.dumps(model))
    after = again.loss_and_grad(p, X, y)
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])


def test_layers_are_owned_by_the_model():
    shared = Dense(3, "relu")
    a = Sequential((4,), [shared, Dense(2)])
    b = Sequential((7,), [shared, Dense(2)])
    assert a.layers[0].n_in == 4 and b.layers[0].n_in == 7 and shared.output_shape is None


# -- losses, predictions, reductions ----------------------------------------------------------

def manual_outputs(model, p, X):
    h = X
    for layer, v in zip(model.layers, model.views(p)):
        h, _ = layer.forward(v, h)
    return h.reshape(len(X), -1)


def test_softmax_cross_entropy_matches_sklearn_log_loss():
    model = image_model()
    X, y = data(model, n=20)
    p = perturbed_params(model)
    probs = model.predict(p, X)
    assert probs.shape == (20, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-12)
    assert np.all(probs >= 0)
    logits = manual_outputs(model, p, X)
    np.testing.assert_array_equal(probs.argmax(axis=1), logits.argmax(axis=1))
    loss, _ = model.loss_and_grad(p, X, y)
    assert loss == pytest.approx(log_loss(y, probs, labels=range(4)), rel=1e-10)


def test_softmax_is_stable_for_huge_logits():
    model = Sequential((2,), [Dense(3)])
    p = np.zeros(model.size)
    model.views(p)[0]["W"][...] = [[1000, -1000, 0], [0, 0, 0]]
    X = np.array([[1.0, 0.0], [-1.0, 0.0]])
    probs = model.predict(p, X)
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs, [[1, 0, 0], [0, 1, 0]], atol=1e-300)
    loss, g = model.loss_and_grad(p, X, np.array([1, 1]))
    assert loss == pytest.approx(1000) and np.all(np.isfinite(g))



@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_gradient_has_no_subnormals_for_a_sharp_softmax(dtype):
    # Logits 0, -1, ..., -799: the softmax underflows through the subnormal range (float32 near
    # -88..-103, float64 near -708..-745), which slows every matmul of the backward pass on Intel
    # CPUs. Those entries become exact zeros; everything the float can resolve is unchanged.
    model = Sequential((1,), [Dense(800)])
    p = np.zeros(model.size, dtype=dtype)
    model.views(p)[0]["b"][...] = -np.arange(800)
    X, y = np.zeros((2, 1), dtype=dtype), np.array([0, 5])
    _, g = model.loss_and_grad(p, X, y)
    info = np.finfo(dtype)
    assert not np.any((g != 0) & (np.abs(g) < info.tiny)), "subnormal entries in the gradient"
    share = np.exp(-np.arange(800.0) - np.log(np.exp(-np.arange(800.0)).sum())) / 2  # p / batch
    kept = share >= info.tiny / info.eps
    assert kept[:60].all() and not kept[-10:].any()  # both kinds of entries are exercised
    grad_b = model.views(g)[0]["b"][6:]  # classes 6.. are nobody's label: gradient 2 * share
    np.testing.assert_allclose(grad_b[kept[6:]], 2 * share[6:][kept[6:]], rtol=1e-5)
    assert np.all(grad_b[~kept[6:]] == 0)

def test_mse_loss_and_raw_predictions():
    model = Sequential((5,), [Dense(4, "tanh"), Dense(2)], loss="mean_squared_error")
    assert model.loss == "mse"
    X, t = data(model, n=8)
    p = perturbed_params(model)
    out = model.predict(p, X)
    np.testing.assert_allclose(out, manual_outputs(model, p, X))
    loss, _ = model.loss_and_grad(p, X, t)
    assert loss == pytest.approx(0.5 * np.mean(np.sum((out - t) ** 2, axis=1)), rel=1e-12)
    one = Sequential((5,), [Dense(1)], loss="mse")
    q = one.init(0).astype(np.float64)
    flat_t = np.arange(8.0)
    assert one.loss_and_grad(q, X, flat_t)[0] == one.loss_and_grad(q, X, flat_t[:, None])[0]


def test_predict_is_independent_of_batch_size_and_input_layout():
    model = image_model()
    X, _ = data(model, n=13)
    p = model.init(0)
    full = model.predict(p, X)
    np.testing.assert_allclose(model.predict(p, X, batch_size=4), full, rtol=1e-6)
    np.testing.assert_array_equal(model.predict(p, X.reshape(13, -1)), full)


def test_sum_reduction_and_regularizer_are_consistent_with_mean():
    model = image_model(l2=0.3)
    X, y = data(model, n=6)
    p = perturbed_params(model)
    mean, g_mean = model.loss_and_grad(p, X, y, regularize=False)
    total, g_sum = model.loss_and_grad(p, X, y, reduction="sum", regularize=False)
    assert total == pytest.approx(6 * mean, rel=1e-12)
    np.testing.assert_allclose(g_sum, 6 * g_mean, rtol=1e-10, atol=1e-14)
    # Portions of a batch add up to the whole (what Sandblaster relies on).
    a, g_a = model.loss_and_grad(p, X[:2], y[:2], reduction="sum", regularize=False)
    b, g_b = model.loss_and_grad(p, X[2:], y[2:], reduction="sum", regularize=False)
    assert a + b == pytest.approx(total, rel=1e-12)
    np.testing.assert_allclose(g_a + g_b, g_sum, rtol=1e-10, atol=1e-14)
    reg, g_reg = model.loss_and_grad(p, X, y)
    mask = model.decay_mask().astype(np.float64)
    assert reg - mean == pytest.approx(0.5 * 0.3 * np.sum(mask * p * p), rel=1e-10)
    np.testing.assert_allclose(g_reg - g_mean, 0.3 * mask * p, rtol=1e-8, atol=1e-14)


def test_float32_follows_params_and_agrees_with_float64():
    model = image_model(l2=0.01)
    X, y = data(model, n=16)
    p = model.init(0)
    loss32, g32 = model.loss_and_grad(p, X, y)  # float64 X is cast to the params' dtype
    loss64, g64 = model.loss_and_grad(p.astype(np.float64), X, y)
    assert g32.dtype == np.float32 and model.predict(p, X).dtype == np.float32
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    np.testing.assert_allclose(g32, g64, rtol=1e-3, atol=1e-5)
    ints = np.arange(16 * 112).reshape(16, 112) % 5
    np.testing.assert_allclose(model.predict(p, ints), model.predict(p, ints.astype(np.float32)))


def test_reused_buffers_never_leak_between_calls():
    model = image_model()
    X, y = data(model, n=9)
    p = perturbed_params(model)
    first = model.loss_and_grad(p, X, y)
    model.loss_and_grad(p, *data(model, n=30, seed=5))  # larger batch, other data
    out = np.full_like(p, np.nan)
    loss, g = model.loss_and_grad(p, X, y, out=out)
    assert g is out and loss == first[0]
    np.testing.assert_array_equal(g, first[1])
    fresh = Sequential.from_dict(model.to_dict())
    np.testing.assert_array_equal(fresh.loss_and_grad(p, X[:4], y[:4])[1],
                                  model.loss_and_grad(p, X[:4], y[:4], validate=False)[1])


def test_threads_sharing_a_model_get_their_own_buffers():
    model = image_model()
    p = perturbed_params(model)
    batches = [data(model, n=16 + i, seed=i) for i in range(4)]
    want = [model.loss_and_grad(p, X, y)[1] for X, y in batches]
    got = [None] * 4

    def work(i):
        for _ in range(20):
            got[i] = model.loss_and_grad(p, *batches[i])[1]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


# -- bad input --------------------------------------------------------------------------------

@pytest.fixture
def classifier():
    model = Sequential((4, 4, 1), [LocallyConnected2D(2, 2, 2, "relu"), Dense(3)])
    return model, model.init(0), *data(model, n=5)


@pytest.mark.parametrize("change, match", [
    (lambda p, X, y: (p, X[0], y), "X must have shape"),
    (lambda p, X, y: (p, X.reshape(5, 2, 8, 1), y), "X must have shape"),
    (lambda p, X, y: (p, X.reshape(5, 16)[:, :15], y), "X must have shape"),
    (lambda p, X, y: (p, X[:0], y[:0]), "empty"),
    (lambda p, X, y: (p, X.astype(complex), y), "real numbers"),
    (lambda p, X, y: (p, X > 0, y), "real numbers"),
    (lambda p, X, y: (p, X, y[:4]), r"labels must have shape \(5,\)"),
    (lambda p, X, y: (p, X, y[:, None]), "labels must have shape"),
    (lambda p, X, y: (p, X, np.array([0, 1, 2, 3, 0])), r"\[0, 3\)"),
    (lambda p, X, y: (p, X, np.array([0, 1, -1, 2, 0])), r"\[0, 3\)"),
    (lambda p, X, y: (p, X, y.astype(np.float32)), "integer"),
    (lambda p, X, y: (p[:-1], X, y), "flat float vector"),
    (lambda p, X, y: (p.astype(np.int32), X, y), "flat float vector"),
])
def test_bad_batches(classifier, change, match):
    model, p, X, y = classifier
    with pytest.raises(ValueError, match=match):
        model.loss_and_grad(*change(p, X, y))


def test_bad_call_arguments(classifier):
    model, p, X, y = classifier
    with pytest.raises(ValueError, match="reduction"):
        model.loss_and_grad(p, X, y, reduction="max")
    with pytest.raises(ValueError, match="out must have"):
        model.loss_and_grad(p, X, y, out=np.empty(3, np.float32))
    with pytest.raises(ValueError, match="X must have shape"):
        model.predict(p, X[:, :3])
    regression = Sequential((3,), [Dense(2)], loss="mse")
    with pytest.raises(ValueError, match=r"targets must have shape \(4, 2\)"):
        regression.loss_and_grad(regression.init(0), np.zeros((4, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="real numbers"):
        regression.loss_and_grad(regression.init(0), np.zeros((4, 3)), np.full((4, 2), "a"))


@pytest.mark.parametrize("make, match", [
    (lambda: Dense(0), "units must be a positive integer"),
    (lambda: Dense(2.5), "units must be a positive integer"),
    (lambda: Dense(True), "units must be a positive integer"),
    (lambda: Dense(3, "softplus"), "unknown activation"),
    (lambda: LocallyConnected2D(0, 3), "filters"),
    (lambda: LocallyConnected2D(2, (3, 0)), "kernel_size"),
    (lambda: LocallyConnected2D(2, (3, 3, 3)), "kernel_size must be an int or 2 ints"),
    (lambda: LocallyConnected2D(2, 3, strides=0), "strides"),
    (lambda: LocallyConnected1D(2, 3, strides=(1, 1)), "strides must be an int or 1 ints"),
    (lambda: LocallyConnected2D(2, None), "kernel_size"),
    (lambda: Sequential((6, 6, 1), [LocallyConnected2D(2, (3, 7))]), r"layer 0 .*larger than"),
    (lambda: Sequential((6,), [Dense(4), LocallyConnected1D(2, 3)]), r"layer 1 .*\(L, C\)"),
    (lambda: Sequential((6, 2), [LocallyConnected2D(2, 3)]), r"\(H, W, C\)"),
    (lambda: Sequential((6,), [Dense(4)], loss="hinge"), "unknown loss"),
    (lambda: Sequential((6,), [Dense(4)], l2=-1), "l2"),
    (lambda: Sequential((6,), [Dense(4)], l2=float("nan")), "l2"),
    (lambda: layer_from_dict({"type": "dense"}), "bad arguments"),
])
def test_bad_layer_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_check_data_names_the_mismatch():
    model = image_model()
    model.check_data((8, 7, 2), 4)
    model.check_data((112,), 4)  # flat stores feed image models
    model.check_data((8, 7, 2), None)
    with pytest.raises(ValueError, match=r"input size does not fit.*\(8, 8, 2\)"):
        model.check_data((8, 8, 2), 4)
    with pytest.raises(ValueError, match="input size does not fit"):
        model.check_data((7, 8, 2), 4)  # same size, other shape: ambiguous
    with pytest.raises(ValueError, match="class count mismatch: the data has 10 classes"):
        model.check_data((8, 7, 2), 10)
    regression = Sequential((3,), [Dense(2)], loss="mse")
    with pytest.raises(ValueError, match="target count mismatch"):
        regression.check_data((3,), 1)


# -- description ------------------------------------------------------------------------------

def test_flops_and_describe():
    model = Sequential((440,), [Dense(1024, "relu"), Dense(2048)])
    f0, f1 = 2 * 440 * 1024, 2 * 1024 * 2048
    assert [layer.flops_per_example() for layer in model.layers] == [f0, f1]
    assert model.flops_per_example() == 3 * (f0 + f1) - f0  # no input gradient for layer 0
    lc = image_model()
    assert lc.layers[0].flops_per_example() == 2 * 3 * 6 * 12 * 3
    text = repr(lc)
    assert text == lc.describe()
    for layer, (a, b) in zip(lc.layers, lc.layer_ranges):
        line = next(row for row in text.splitlines() if repr(layer) in row)
        assert str(layer.output_shape) in line and f"{b - a:,}" in line
    assert f"total params {lc.size:,}" in text


# -- CuPy -------------------------------------------------------------------------------------

def test_cupy_matches_numpy():
    cupy = pytest.importorskip("cupy")
    if not gpu_available():
        pytest.skip("no CUDA device")
    model = Sequential((8, 7, 2), [LocallyConnected2D(3, (3, 2), (2, 1), "relu"),
                                   Dense(6, "tanh"), Dense(4)], l2=0.01)
    X, y = data(model, n=11)
    p = perturbed_params(model)
    loss, g = model.loss_and_grad(p, X, y)
    loss_gpu, g_gpu = model.loss_and_grad(cupy.asarray(p), cupy.asarray(X), cupy.asarray(y))
    assert isinstance(g_gpu, cupy.ndarray)
    assert loss_gpu == pytest.approx(loss, rel=1e-10)
    np.testing.assert_allclose(cupy.asnumpy(g_gpu), g, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(cupy.asnumpy(model.predict(cupy.asarray(p), cupy.asarray(X))),
                               model.predict(p, X), rtol=1e-10)
    lc1 = Sequential((9, 2), [LocallyConnected1D(2, 3, 2, "sigmoid"), Dense(3)], loss="mse")
    X1, t1 = data(lc1)
    q = perturbed_params(lc1)
    np.testing.assert_allclose(
        cupy.asnumpy(lc1.loss_and_grad(cupy.asarray(q), cupy.asarray(X1), cupy.asarray(t1))[1]),
        lc1.loss_and_grad(q, X1, t1)[1], rtol=1e-8, atol=1e-12)
