"""`python -m dpnet.train --reproducible`: the same checkpoint, bit for bit, at 1, 2 and 4 ranks,
and after a resume at another number of ranks."""

import os

import numpy as np
import pytest

from dpnet.train import ConfigError, TrainConfig, validate
from tests.train_helpers import (STEPS_PER_EPOCH, TINY, cifar_dir, read_checkpoint,  # noqa: F401 (fixture)
                                 run_ok, run_train)

CKPT = os.path.join("dpnet_run", "checkpoint.h5")
STEPS = 20  # 4 epochs of 5 steps, 8 micro-shards of 4 images
MODELS = {"threelayer": [], "convnet": ["--model", "convnet", "--stages", "8,8/16"]}


def args(data, model, *extra):
    """Sync batchnorm, float32, augmentation on: the defaults."""
    return ["--data", data, *TINY, *MODELS[model], "--epochs", str(STEPS // STEPS_PER_EPOCH), *extra]


def assert_identical(a, b, what):
    """Every array of two checkpoints the same bits, and every attribute but the number of ranks
    (and how the run was started: the options given, --resume)."""
    for group in ("params", "optimizer", "batchnorm"):
        assert sorted(a[group]) == sorted(b[group]), what
        for name in a[group]:
            assert np.array_equal(a[group][name], b[group][name]), f"{what}: {group}/{name}"
    assert a["optimizer_attrs"] == b["optimizer_attrs"], what
    def kept(attrs):
        config = {k: v for k, v in attrs["config"].items() if k not in ("given", "resume")}
        return {**{k: v for k, v in attrs.items() if k != "world_size"}, "config": config}
    assert kept(a["attrs"]) == kept(b["attrs"]), what


@pytest.mark.parametrize("model", list(MODELS))
def test_the_checkpoint_after_20_steps_is_the_same_bits_at_1_2_and_4_ranks(cifar_dir, tmp_path, model):
    runs = {}
    for ranks in (None, 2, 4):
        cwd = tmp_path / f"ranks-{ranks or 1}"
        cwd.mkdir()
        run_ok(args(cifar_dir, model, "--reproducible"), cwd, ranks, timeout=240)
        runs[ranks or 1] = read_checkpoint(cwd / CKPT)
    assert runs[1]["attrs"]["step"] == STEPS
    assert runs[4]["attrs"]["world_size"] == 4 and runs[4]["attrs"]["rng_states"] == []
    for ranks in (2, 4):
        assert_identical(runs[ranks], runs[1], f"{model} at {ranks} ranks")
    # control: the default mode's bits change with the number of ranks
    for ranks in (None, 2):
        cwd = tmp_path / f"default-{ranks or 1}"
        cwd.mkdir()
        run_ok(args(cifar_dir, model), cwd, ranks, timeout=240)
    one, two = read_checkpoint(tmp_path / "default-1" / CKPT), read_checkpoint(tmp_path / "default-2" / CKPT)
    assert any(not np.array_equal(one["params"][k], two["params"][k]) for k in one["params"])


def test_a_4_rank_run_resumed_at_2_ranks_ends_as_the_4_rank_run(cifar_dir, tmp_path):
    """Local batchnorm (per micro-shard statistics), which the default mode cannot resume at
    another number of ranks: stopped at step 10 of a 4-rank run, resumed at 2 ranks, the final
    checkpoint is the uninterrupted 4-rank run's."""
    run_args = args(cifar_dir, "convnet", "--reproducible", "--bn-mode", "local")
    (tmp_path / "straight").mkdir()
    (tmp_path / "resumed").mkdir()
    run_ok(run_args, tmp_path / "straight", 4, timeout=240)
    run_ok(run_args + ["--max-steps", "10"], tmp_path / "resumed", 4, timeout=240)
    resumed = run_ok(["--data", cifar_dir, "--no-progress", "--epochs", str(STEPS // STEPS_PER_EPOCH), "--resume", CKPT],
                     tmp_path / "resumed", 2, timeout=240)
    assert "resumed from dpnet_run/checkpoint.h5 at step 10 (epoch 2), written by 4 rank(s)" in resumed.stdout
    assert_identical(read_checkpoint(tmp_path / "resumed" / CKPT), read_checkpoint(tmp_path / "straight" / CKPT),
                     "resumed at 2 ranks")


@pytest.mark.parametrize("extra, ranks, message", [
    (["--micro-shards", "8"], 3, "--reproducible --micro-shards 8: 3 ranks cannot share 8 micro-shards equally: "
                                 "the number of ranks must divide it (1, 2, 4, 8)"),
    (["--micro-shards", "12"], 2, "--reproducible --micro-shards 12: the number of micro-shards must be a power of two"),
    (["--reduction", "allreduce"], 2, "--reproducible sums gradients in its own fixed order: leave out --reduction"),
    (["--bucket-mb", "1"], 2, "--reproducible sums gradients in its own fixed order: leave out --reduction"),
])
def test_settings_the_mode_cannot_keep_are_refused(extra, ranks, message):
    from dpnet.train import parse_args
    config = parse_args(["--reproducible", *extra])
    with pytest.raises(ConfigError) as err:
        validate(config, ranks)
    assert str(err.value).startswith(message), str(err.value)


def test_a_bad_rank_count_is_one_line_and_exit_2(cifar_dir, tmp_path):
    run = run_train(args(cifar_dir, "threelayer", "--reproducible", "--micro-shards", "4"), tmp_path, 3)
    assert run.returncode == 2, str(run)
    assert run.stderr.strip() == ("python -m dpnet.train: error: --reproducible --micro-shards 4: 3 ranks cannot "
                                  "share 4 micro-shards equally: the number of ranks must divide it (1, 2, 4)"), str(run)


def test_the_default_config_is_not_reproducible():
    assert TrainConfig().reproducible is False and TrainConfig().micro_shards == 8


def _dx_cache(path, form, weights):
    """An autotune cache that timed `form` faster for every affine weight of `weights` at 4 rows
    per pass (32 images, 8 micro-shards), as if measured on this machine."""
    import json

    from dpnet.autotune import dx_signature, machine_key
    seconds = {"plain": 1.0, "transposed": 1.0, form: 0.5}
    choices = {dx_signature(4, shape, "float32", 1): {"choice": form, "seconds": seconds} for shape in weights}
    path.write_text(json.dumps({machine_key(): choices}))
    return str(path)


def test_a_resume_keeps_the_checkpoints_measured_choices_whatever_this_machines_cache_says(cifar_dir, tmp_path):
    """--affine-dx auto in the reproducible mode: the choices are part of the run. The 4-rank
    run's cache times 'transposed' faster; at the resume the cache says 'plain', and the run goes
    on with the checkpoint's choices, measuring nothing, and ends as the uninterrupted run. (On a
    machine where both forms give the same bits only the saved choices tell them apart; that
    the passes compute with the model's choices is tests/test_parallel_units.py's. Where the
    transposed form's bits differ from plain's, the reproducible mode never takes it.)"""
    from dpnet.autotune import same_dx_bits
    from tests.train_helpers import clean_env
    weights = [(32 * 16 * 16, 16), (16, 10)]  # ThreeLayerConvNet with --hidden-dim 16
    form = "transposed" if all(same_dx_bits("transposed", "plain", 4, w, np.float32) for w in weights) else "plain"
    transposed = clean_env(DPNET_AUTOTUNE_CACHE=_dx_cache(tmp_path / "transposed.json", "transposed", weights))
    plain = clean_env(DPNET_AUTOTUNE_CACHE=_dx_cache(tmp_path / "plain.json", "plain", weights))
    run_args = args(cifar_dir, "threelayer", "--reproducible", "--conv-algorithm", "im2col")  # --affine-dx auto
    (tmp_path / "straight").mkdir()
    (tmp_path / "resumed").mkdir()
    straight = run_ok(run_args, tmp_path / "straight", 4, env=transposed, timeout=240)
    assert (f"affine input gradients (--affine-dx auto): {form} for W2, W3 (all from "
            in straight.stdout), str(straight)
    run_ok(run_args + ["--max-steps", "10"], tmp_path / "resumed", 4, env=transposed, timeout=240)
    resumed = run_ok(["--data", cifar_dir, "--no-progress", "--epochs", str(STEPS // STEPS_PER_EPOCH),
                      "--resume", CKPT], tmp_path / "resumed", 2, env=plain, timeout=240)
    assert (f"affine input gradients (--affine-dx auto): {form} for W2, W3 (the checkpoint's choices, kept in "
            f"the reproducible mode: {CKPT})") in resumed.stdout, str(resumed)
    final = read_checkpoint(tmp_path / "resumed" / CKPT)
    assert final["attrs"]["layer_choices"] == {"conv": {}, "dx": {"W2": form, "W3": form}}
    assert_identical(final, read_checkpoint(tmp_path / "straight" / CKPT),
                     "resumed at 2 ranks with the checkpoint's choices")


def test_auto_choices_never_change_a_bit_in_the_reproducible_mode(cifar_dir, tmp_path):
    """--reproducible with the default auto choices, and a cache that says Winograd and the
    transposed dx are the fastest: only ways that give im2col's and plain's bits on this machine
    (checked by the run itself, at every micro-shard size) may be chosen, and Winograd never
    does, so the run ends with the bits of the fixed ways."""
    import json
    import re

    from dpnet.autotune import dx_signature, machine_key, signature
    from dpnet.models import ConvNet
    from tests.train_helpers import clean_env
    model = ConvNet(stages=((8, 8), (16,)), hidden_dims=(16,), dtype=np.float32)
    seconds = {"im2col": 3.0, "im2col-whole": 2.0, "winograd": 1.0}
    entries = {}
    for layer, in_shape, w_shape, param in model.conv_layers():
        entries[signature((4, *in_shape), w_shape, param, "float32", 1, layer != 1)] = {
            "choice": "winograd", "seconds": seconds}
    for _, shape in model.affine_weights():
        entries[dx_signature(4, shape, "float32", 1)] = {"choice": "transposed",
                                                         "seconds": {"plain": 2.0, "transposed": 1.0}}
    cache = tmp_path / "fast-but-other-bits.json"
    cache.write_text(json.dumps({machine_key(): entries}))
    (tmp_path / "auto").mkdir()
    (tmp_path / "fixed").mkdir()
    auto = run_ok(args(cifar_dir, "convnet", "--reproducible", "--max-steps", "6"), tmp_path / "auto", 2,
                  env=clean_env(DPNET_AUTOTUNE_CACHE=str(cache)), timeout=240)
    said = re.search(r"^convolutions \(--conv-algorithm auto\): (.*)$", auto.stdout, re.M)
    assert said and "winograd" not in said.group(1) and said.group(1).endswith(
        "; only ways with the bits of im2col and plain)"), str(auto)
    fixed = run_ok(args(cifar_dir, "convnet", "--reproducible", "--max-steps", "6", "--conv-algorithm", "im2col",
                        "--affine-dx", "plain"), tmp_path / "fixed", 2, timeout=240)
    assert "--conv-algorithm auto" not in fixed.stdout, str(fixed)
    a, b = read_checkpoint(tmp_path / "auto" / CKPT), read_checkpoint(tmp_path / "fixed" / CKPT)
    assert "winograd" not in a["attrs"]["layer_choices"]["conv"].values()
    for group in ("params", "optimizer", "batchnorm"):
        for name in a[group]:
            assert np.array_equal(a[group][name], b[group][name]), f"{group}/{name}"


def test_the_micro_shard_sizes_a_run_sees():
    """The sizes the bit checks of auto choices cover: every full batch's cut and the last,
    partial batch's (4170 = 32 x 128 + 74), never 0."""
    from dpnet.train.loop import micro_shard_sizes
    assert micro_shard_sizes(4170, 128, 8) == [9, 10, 16]
    assert micro_shard_sizes(160, 32, 8) == [4]
    assert micro_shard_sizes(10, 4, 8) == [1]  # micro-shards of 0 and 1 examples


def test_the_header_names_layers_in_runs():
    """A ResNet-110 has 109 convolutions: the choices line names runs of layers, not each; the
    affine weights it names one by one (several may share a form)."""
    from dpnet.train.loop import choices_text, runs
    assert runs([]) == []
    assert runs([4]) == ["4"]
    assert runs([1, 2, 3, 5, 7, 8, 74]) == ["1-3", "5", "7-8", "74"]
    assert runs(list(range(1, 39)) + [74]) == ["1-38", "74"]
    conv = {**{k: "im2col" for k in [1, 2, 3, 9]}, 4: "winograd", 5: "winograd"}
    dx = {"W7": "plain", "W6": "plain", "W8": "transposed"}
    assert choices_text(conv, dx) == (
        "convolutions (--conv-algorithm auto): im2col for layer(s) 1-3, 9; winograd for layer(s) 4-5; "
        "affine input gradients (--affine-dx auto): plain for W6, W7; transposed for W8")
    assert choices_text(None, dx) == (
        "affine input gradients (--affine-dx auto): plain for W6, W7; transposed for W8")
    assert choices_text({}, {}) == ("convolutions (--conv-algorithm auto): none to choose for this model; "
                                    "affine input gradients (--affine-dx auto): none to choose for this model")
