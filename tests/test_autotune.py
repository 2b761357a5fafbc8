"""dpnet.autotune: each convolution's algorithm and each affine layer's input-gradient form
measured once per machine and layer shape, then read from the cache; and --conv-algorithm auto,
--affine-dx auto in a run."""

import json
import os
import re

import numpy as np
import pytest

from dpnet.autotune import Tuner, applicable, machine_key, signature, tune_dx_forms, tune_model
from dpnet.models import ConvNet, ResNet, ThreeLayerConvNet
from tests.train_helpers import TINY, cifar_dir, clean_env, run_ok  # noqa: F401


def fake_timer(winner, calls):
    """A measurement in which `winner` is faster, counting its calls."""
    def measure(algorithm, x_shape, w_shape, conv_param, dtype, compute_dx=True):
        calls.append((algorithm, x_shape, compute_dx))
        return 1.0 if algorithm == winner else 2.0
    return measure


def test_the_faster_algorithm_is_chosen_once_then_read_from_the_cache(tmp_path):
    path = str(tmp_path / "autotune.json")
    model = ConvNet(input_dim=(3, 8, 8), stages=((4, 4), (5,)), hidden_dims=(6,))
    calls = []
    choices = tune_model(model, 16, Tuner(path, fake_timer("winograd", calls)))
    assert choices == {1: "winograd", 2: "winograd", 3: "winograd"}
    assert len(calls) == 6  # 3 layer shapes x 2 algorithms: at 8x8 and 4x4, im2col cuts no GEMM
    assert [dx for *_, dx in calls] == [False, False, True, True, True, True]  # the first conv takes the data
    stored = json.load(open(path))
    assert list(stored) == [machine_key()] and len(stored[machine_key()]) == 3
    again = Tuner(path, fake_timer("im2col", calls))  # the cache answers: nothing measured
    assert tune_model(model, 16, again) == choices and again.measured == 0 and len(calls) == 6
    other = Tuner(path, fake_timer("im2col", calls))  # another batch size is another shape
    assert set(tune_model(model, 32, other).values()) == {"im2col"} and other.measured == 3


def test_every_conv_is_choosable_winograd_only_where_it_applies():
    assert ThreeLayerConvNet().conv_layers() == [(1, (3, 32, 32), (32, 3, 7, 7), {"stride": 1, "pad": 3})]
    assert applicable((32, 3, 7, 7), {"stride": 1, "pad": 3}) == ["im2col", "im2col-whole"]
    resnet = ResNet(depth=8)
    layers = {layer: (x_shape, param) for layer, x_shape, _, param in resnet.conv_layers()}
    assert sorted(layers) == [1, 2, 3, 4, 5, 6, 7]
    assert layers[4] == ((16, 33, 33), {"stride": 2, "pad": 0})  # the zero row and column added first
    assert layers[6] == ((32, 17, 17), {"stride": 2, "pad": 0}) and layers[7] == ((64, 8, 8), {"stride": 1, "pad": 1})
    assert applicable((4, 3, 3, 3), {"stride": 2, "pad": 1}) == ["im2col", "im2col-whole"]
    with pytest.raises(ValueError, match=r"layer 4 \(filters \(32, 16, 3, 3\), stride 2\) cannot be computed by "
                                         r"'winograd': use one of \['im2col', 'im2col-whole'\]"):
        resnet.set_conv_algorithms({4: "winograd"})
    with pytest.raises(ValueError, match=r"no convolution at layer\(s\) \[9\]"):
        resnet.set_conv_algorithms({9: "im2col"})
    resnet.use_conv_algorithm("winograd")  # where it applies
    assert resnet.conv_algorithms == {1: "winograd", 2: "winograd", 3: "winograd", 5: "winograd", 7: "winograd"}


def test_whole_gemms_are_a_candidate_where_im2col_cuts_them_and_old_choices_are_measured_again(tmp_path):
    """A 32 -> 32 3x3 conv on 32x32 images: im2col cuts its GEMMs into chunks, so im2col-whole is a
    candidate; a cached choice measured before that candidate existed is measured again."""
    x_shape, w_shape, param = (16, 32, 32, 32), (32, 32, 3, 3), {"stride": 1, "pad": 1}
    assert applicable(w_shape, param, x_shape) == ["im2col", "im2col-whole", "winograd"]
    assert applicable(w_shape, param, (16, 32, 8, 8)) == ["im2col", "winograd"]
    path = tmp_path / "autotune.json"
    sig = signature(x_shape, w_shape, param, np.float32, 1)
    path.write_text(json.dumps({machine_key(): {sig: {"choice": "im2col", "seconds": {"im2col": 1, "winograd": 2}}}}))
    calls = []
    tuner = Tuner(str(path), fake_timer("im2col-whole", calls))
    assert tuner.choose(x_shape, w_shape, param, np.float32) == "im2col-whole" and tuner.measured == 1
    assert [a for a, *_ in calls] == ["im2col", "im2col-whole", "winograd"]


def test_a_real_measurement_gives_a_choice(tmp_path):
    tuner = Tuner(str(tmp_path / "c.json"))
    choice = tuner.choose((4, 32, 32, 32), (32, 32, 3, 3), {"stride": 1, "pad": 1}, np.float32)
    assert choice in ("im2col", "im2col-whole", "winograd") and tuner.measured == 1
    seconds = json.load(open(tmp_path / "c.json"))[machine_key()]
    assert all(set(v["seconds"]) == {"im2col", "im2col-whole", "winograd"} and v["seconds"][v["choice"]] == min(v["seconds"].values())
               for v in seconds.values())


def test_auto_choices_in_a_run(cifar_dir, tmp_path):
    """auto is the default for both choices: at 2 ranks rank 0 measures, then a run reads all."""
    cache = tmp_path / "autotune.json"
    args = ["--data", cifar_dir, *TINY, "--model", "convnet", "--stages", "8/16", "--max-steps", "2"]
    env = clean_env(DPNET_AUTOTUNE_CACHE=str(cache))
    first = run_ok(args, tmp_path, 2, env=env)
    said = [line for line in first.lines if line.startswith("convolutions (--conv-algorithm auto): ")]
    assert len(said) == 1 and "; affine input gradients (--affine-dx auto): " in said[0], str(first)
    assert re.search(rf"\(4 shape\(s\) measured now in [\d.]+ s, the rest from {re.escape(str(cache))}\)$",
                     said[0]), str(first)  # 2 convs, 2 affine
    (tmp_path / "again").mkdir()
    second = run_ok(args, tmp_path / "again", 2, env=env)
    assert f"(all from {cache})" in second.stdout, str(second)
    assert os.path.exists(cache)


def test_each_affine_layers_faster_dx_form_is_chosen_once_then_read_from_the_cache(tmp_path):
    path = str(tmp_path / "autotune.json")
    model = ThreeLayerConvNet(input_dim=(3, 8, 8), num_filters=4, hidden_dim=6)
    assert model.affine_weights() == [("W2", (64, 6)), ("W3", (6, 10))]
    calls = []

    def measure(form, rows, w_shape, dtype):  # transposed wins for the wide layer only
        calls.append((form, rows, w_shape))
        return 1.0 if (form == "transposed") == (w_shape[0] > 10) else 2.0

    choices = tune_dx_forms(model, 4, Tuner(path, measure_dx=measure))
    assert choices == {"W2": "transposed", "W3": "plain"} and len(calls) == 4
    again = Tuner(path, measure_dx=lambda *a: calls.append(a))  # the cache answers
    assert tune_dx_forms(model, 4, again) == choices and again.measured == 0 and len(calls) == 4
    assert tune_dx_forms(model, 8, Tuner(path, measure_dx=measure)) == choices and len(calls) == 8  # new rows


def test_a_real_dx_measurement_gives_a_choice(tmp_path):
    tuner = Tuner(str(tmp_path / "c.json"))
    assert tuner.choose_dx_form(3, (40, 7), np.float32) in ("plain", "transposed") and tuner.measured == 1


def test_a_models_dx_forms_change_rounding_only(rng_seed=0):
    """Every affine layer's input gradient made the transposed way: the same gradients as the
    plain way to float64 rounding; unknown weights and forms are refused."""
    rng = np.random.default_rng(rng_seed)
    X, y = rng.standard_normal((4, 3, 8, 8)), rng.integers(0, 10, 4)
    grads = {}
    for form in ("plain", "transposed"):
        model = ConvNet(input_dim=(3, 8, 8), stages=((4,), (5,)), hidden_dims=(6,), dtype=np.float64)
        model.set_dx_forms({name: form for name, _ in model.affine_weights()})
        grads[form] = model.loss(X, y)[1]
    for name, grad in grads["plain"].items():
        np.testing.assert_allclose(grads["transposed"][name], grad, rtol=1e-10, atol=1e-12, err_msg=name)
    with pytest.raises(ValueError, match=r"no affine weight \['W1'\]"):
        model.set_dx_forms({"W1": "plain"})
    with pytest.raises(ValueError, match="dx forms must be one of"):
        model.set_dx_forms({"W3": "fast"})


def test_a_fixed_affine_dx_sets_every_layer():
    from dpnet.parallel import SerialComm
    from dpnet.train import TrainConfig, build_model
    model = build_model(TrainConfig(model="threelayer", affine_dx="transposed"), SerialComm())
    assert model.dx_forms == {"W2": "transposed", "W3": "transposed"}
    assert build_model(TrainConfig(model="threelayer", affine_dx="auto"), SerialComm()).dx_forms == {}


def test_with_bits_of_only_ways_that_give_the_references_bits_are_candidates(tmp_path):
    """The reproducible mode's auto: a way is timed and chosen only if the bit check says it
    gives the reference's bits at every number of images asked; the checks are made by each
    tuner afresh (never read from the cache), and a cache entry timed for all ways serves the
    narrower choice without timing again."""
    path = str(tmp_path / "c.json")
    checked, timed = [], []
    seconds = {"im2col": 3.0, "im2col-whole": 2.0, "winograd": 1.0}

    def same_bits(algorithm, reference, x_shape, w_shape, conv_param, dtype, compute_dx=True):
        assert reference == "im2col"
        checked.append((algorithm, x_shape[0]))
        return algorithm == "im2col-whole" and x_shape[0] != 3  # at 3 images whole is other bits

    def measure(algorithm, x_shape, w_shape, conv_param, dtype, compute_dx=True):
        timed.append(algorithm)
        return seconds[algorithm]

    def tuner():
        return Tuner(path, measure=measure, same_bits=same_bits,
                     same_dx=lambda form, reference, rows, w_shape, dtype: checked.append((form, rows)) or False)

    shapes = ((4, 32, 32, 32), (32, 32, 3, 3), {"stride": 1, "pad": 1}, np.float32)
    one = tuner()
    assert one.choose(*shapes, bits_of="im2col", bits_at=(2,)) == "im2col-whole"
    assert sorted(checked) == [("im2col-whole", 2), ("im2col-whole", 4), ("winograd", 2)]  # one miss is enough
    assert sorted(timed) == ["im2col", "im2col-whole"]
    checked.clear(), timed.clear()
    assert one.choose(*shapes, bits_of="im2col", bits_at=(2,)) == "im2col-whole" and checked == timed == []
    assert one.choose(*shapes, bits_of="im2col", bits_at=(2, 3)) == "im2col"  # no timing: one candidate
    assert checked == [("im2col-whole", 3)] and timed == []
    checked.clear()
    assert tuner().choose(*shapes) == "winograd" and sorted(timed) == ["im2col", "im2col-whole", "winograd"]
    timed.clear()
    assert tuner().choose(*shapes, bits_of="im2col") == "im2col-whole" and timed == []  # the cached timings
    assert sorted(checked) == [("im2col-whole", 4), ("winograd", 4)]  # a new tuner checks again
    checked.clear()
    # a dx form whose bits differ from plain's is never timed: plain is the only candidate
    assert tuner().choose_dx_form(16, (64, 8), np.float32, bits_of="plain") == "plain"
    assert checked == [("transposed", 16)] and timed == []
    assert not any(" bits " in key for key in json.load(open(path))[machine_key()])


@pytest.mark.parametrize("entry", [{"seconds": ["im2col", "im2col-whole", "winograd"]},
                                   {"seconds": {"im2col": None, "im2col-whole": 1.0, "winograd": 1.0}},
                                   {"seconds": {"im2col": "1", "im2col-whole": 1.0, "winograd": 1.0}},
                                   {"seconds": {"im2col": True, "im2col-whole": 1.0, "winograd": 1.0}},
                                   "fast", ["winograd"]],
                         ids=["list", "null", "string", "bool", "a-string", "a-list"])
def test_a_cache_entry_of_another_form_is_measured_again(tmp_path, entry):
    """The cache file is shared by every version on the machine: an entry this one cannot read
    costs a measurement, never a crash or a choice made from it."""
    shapes = ((4, 32, 32, 32), (32, 32, 3, 3), {"stride": 1, "pad": 1}, np.float32)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({machine_key(): {signature(*shapes[:3], np.float32, 1): entry}}))
    seconds = {"im2col": 2.0, "im2col-whole": 3.0, "winograd": 4.0}
    tuner = Tuner(str(path), measure=lambda a, *args, **kw: seconds[a])
    assert tuner.choose(*shapes) == "im2col" and tuner.measured == 1


def test_the_bit_checks_see_a_difference_in_any_output(monkeypatch):
    """same_conv_bits compares the output and all three gradients, same_dx_bits the input
    gradient: one unit in the last place of any of them, or of Winograd's different
    arithmetic, makes them answer False; a way against itself is the same bits."""
    import dpnet.autotune as autotune
    import dpnet.layers.affine as affine
    from dpnet.autotune import same_conv_bits, same_dx_bits
    param = {"stride": 1, "pad": 1}
    args = ((2, 4, 8, 8), (4, 4, 3, 3), param, np.float32)
    assert same_conv_bits("im2col", "im2col", *args)
    assert not same_conv_bits("winograd", "im2col", *args)
    conv_pass = autotune._conv_pass
    for which in range(4):  # out, dx, dw, db
        def nudged(algorithm, *a, which=which):
            results = list(conv_pass("im2col", *a))
            if algorithm == "im2col-whole":
                results[which] = np.nextafter(results[which], np.inf)
            return tuple(results)
        monkeypatch.setattr(autotune, "_conv_pass", nudged)
        assert not same_conv_bits("im2col-whole", "im2col", *args), which
        assert same_conv_bits("im2col", "im2col", *args)
    input_grad = affine.input_grad
    assert same_dx_bits("transposed", "transposed", 5, (12, 7), np.float32)
    monkeypatch.setattr(affine, "input_grad", lambda dout, w, form: (
        np.nextafter(input_grad(dout, w, form), np.inf) if form == "transposed" else input_grad(dout, w, form)))
    assert not same_dx_bits("transposed", "plain", 5, (12, 7), np.float32)
