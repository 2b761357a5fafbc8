"""Solver: overfitting a tiny problem, sampling without replacement, seeding, learning-rate
decay, best-parameter bookkeeping (including the homework's empty best_params bug) and
argument checking."""

import numpy as np
import pytest

from dpnet.models import FullyConnectedNet, ThreeLayerConvNet
from dpnet.optim import sgd
from dpnet.solver import Solver

FEATURES = 8
INDEX_SCALE = 0.01  # feature 0 of X_train is INDEX_SCALE * (the example's index)


def make_data(n_train=50, n_val=20, seed=0):
    """Random inputs with random labels: only memorisation fits them. Feature 0 of X_train
    holds the example's index (scaled), so a model can report which rows it was given."""
    rng = np.random.default_rng(seed)
    X_train = rng.standard_normal((n_train, FEATURES))
    X_train[:, 0] = INDEX_SCALE * np.arange(n_train)
    return {"X_train": X_train, "y_train": rng.integers(0, 10, n_train),
            "X_val": rng.standard_normal((n_val, FEATURES)), "y_val": rng.integers(0, 10, n_val)}


def make_model(seed=0):
    return FullyConnectedNet([50], input_dim=FEATURES, weight_scale="he", dtype=np.float64, seed=seed)


def make_solver(model=None, data=None, **kwargs):
    args = dict(update_rule="adam", optim_config={"learning_rate": 1e-2}, batch_size=10,
                num_epochs=3, verbose=False)
    args.update(kwargs)
    return Solver(make_model() if model is None else model, make_data() if data is None else data, **args)


def row_indices(X):
    return np.rint(np.asarray(X)[:, 0] / INDEX_SCALE).astype(int)


def record_batches(model):
    """Wrap model.loss to record the training rows (their index feature) of every call."""
    seen, loss = [], model.loss

    def recording_loss(X, y=None):
        if y is not None:
            seen.append(row_indices(X))
        return loss(X, y)

    model.loss = recording_loss
    return seen


def flat_params(model):
    return np.concatenate([v.ravel() for v in model.params.values()])


# ---------------------------------------------------------------- training works

def test_overfits_small_data():
    solver = make_solver(num_epochs=10, optim_config={"learning_rate": 5e-2})
    solver.train()
    assert solver.train_acc_history[-1] >= 0.9
    assert len(solver.train_acc_history) == len(solver.val_acc_history) == 11
    assert len(solver.loss_history) == 10 * 5
    assert np.mean(solver.loss_history[-5:]) < 0.5 * np.mean(solver.loss_history[:5])
    # control: with learning rate 0 nothing is learned
    frozen = make_solver(num_epochs=10, optim_config={"learning_rate": 0.0})
    frozen.train()
    assert frozen.train_acc_history[-1] < 0.5


def test_overfits_small_convnet():
    rng = np.random.default_rng(0)
    data = {"X_train": rng.standard_normal((30, 3, 8, 8)), "y_train": rng.integers(0, 10, 30),
            "X_val": rng.standard_normal((10, 3, 8, 8)), "y_val": rng.integers(0, 10, 10)}
    model = ThreeLayerConvNet(input_dim=(3, 8, 8), num_filters=4, filter_size=3, hidden_dim=30,
                              weight_scale="he", use_batchnorm=True, dtype=np.float64)
    solver = Solver(model, data, update_rule="adam", optim_config={"learning_rate": 1e-2},
                    batch_size=10, num_epochs=10, verbose=False)
    solver.train()
    assert solver.train_acc_history[-1] >= 0.9


# ---------------------------------------------------------------- minibatches

@pytest.mark.parametrize("n,batch", [(23, 5), (20, 5), (7, 10), (5, 1)])
def test_each_epoch_uses_every_example_once(n, batch):
    model = make_model()
    seen = record_batches(model)
    solver = make_solver(model, make_data(n_train=n), batch_size=batch, num_epochs=3)
    solver.train()
    per_epoch = -(-n // batch)
    assert len(seen) == 3 * per_epoch
    sizes = [batch] * (n // batch) + ([n % batch] if n % batch else [])
    orders = []
    for epoch in range(3):
        batches = seen[epoch * per_epoch:(epoch + 1) * per_epoch]
        assert [len(b) for b in batches] == sizes
        order = np.concatenate(batches)
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
        orders.append(order)
    if n > 5:  # shuffled, and anew each epoch
        assert not np.array_equal(orders[0], np.arange(n))
        assert not np.array_equal(orders[0], orders[1])


def test_labels_travel_with_their_rows():
    model = make_model()
    data = make_data(n_train=17)
    calls, loss = [], model.loss

    def recording_loss(X, y=None):
        if y is not None:
            calls.append((row_indices(X), np.asarray(y)))
        return loss(X, y)

    model.loss = recording_loss
    make_solver(model, data, batch_size=4, num_epochs=1).train()
    for idx, y in calls:
        np.testing.assert_array_equal(y, data["y_train"][idx])


def test_seed_controls_the_run():
    a, b, c = (make_solver(seed=s) for s in (3, 3, 4))
    for s in (a, b, c):
        s.train()
    assert a.loss_history == b.loss_history
    np.testing.assert_array_equal(flat_params(a.model), flat_params(b.model))
    assert a.loss_history != c.loss_history


# ---------------------------------------------------------------- the update rule's contract

def sgd_out_of_place(w, dw, config=None):
    """The homework's contract written functionally: a NEW next_w and a NEW config, w and
    the config passed in left untouched."""
    config = dict(config or {})
    config.setdefault("learning_rate", 1e-2)
    config["steps"] = config.get("steps", 0) + 1
    next_w = w - config["learning_rate"] * dw
    return next_w, config


def parameter_trajectory(solver):
    """Make every training call of solver.model record the flat parameters it sees."""
    seen, loss = [], solver.model.loss

    def recording_loss(X, y=None):
        if y is not None:
            seen.append(flat_params(solver.model))
        return loss(X, y)

    solver.model.loss = recording_loss
    return seen


def test_out_of_place_rule_moves_the_model_as_in_place_sgd():
    """A rule that returns next_w instead of updating w moves the parameters bit for bit as
    dpnet.optim.sgd (w -= learning_rate * dw) does, and its returned config is kept."""
    runs = {}
    for rule in (sgd, sgd_out_of_place):
        solver = make_solver(update_rule=rule, optim_config={"learning_rate": 0.1}, num_epochs=1)
        runs[rule] = solver, parameter_trajectory(solver)
        solver.train()
    (inplace, expected), (solver, seen) = runs[sgd], runs[sgd_out_of_place]
    assert len(seen) == len(expected) == 5
    assert not np.array_equal(expected[0], expected[-1])  # control: in-place sgd trains
    for step, (a, b) in enumerate(zip(seen, expected)):
        np.testing.assert_array_equal(a, b, err_msg=f"parameters before step {step}")
    assert solver.loss_history == inplace.loss_history
    assert solver.optim_config["steps"] == 5


# ---------------------------------------------------------------- learning-rate decay

def test_lr_decay_per_epoch():
    rates = []

    def recording_sgd(w, dw, config=None):
        rates.append(config.get("learning_rate"))
        return sgd(w, dw, config)

    solver = make_solver(update_rule=recording_sgd, optim_config={"learning_rate": 0.1},
                         lr_decay=0.5, num_epochs=3)
    solver.train()
    assert rates == [0.1] * 5 + [0.05] * 5 + [0.025] * 5
    assert solver.optim_config["learning_rate"] == pytest.approx(0.1 * 0.5 ** 3, rel=1e-15)


def test_lr_decay_applies_to_the_rules_default():
    solver = make_solver(update_rule="sgd", optim_config={}, lr_decay=0.9, num_epochs=2)
    solver.train()
    assert solver.optim_config["learning_rate"] == pytest.approx(1e-2 * 0.9 ** 2, rel=1e-15)


# ---------------------------------------------------------------- best parameters

def snapshots_per_epoch(solver, per_epoch):
    """Make solver's update rule record the flat parameters after every step; returns a
    function epoch -> parameters at the end of that epoch (0: initial)."""
    initial = flat_params(solver.model)
    after_step, rule = [], solver.update_rule

    def recording_rule(w, dw, config=None):
        out = rule(w, dw, config)
        after_step.append(np.array(w, copy=True))
        return out

    solver.update_rule = recording_rule
    return lambda epoch: initial if epoch == 0 else after_step[epoch * per_epoch - 1]


def test_model_ends_with_best_val_params():
    solver = make_solver(num_epochs=6, optim_config={"learning_rate": 3e-2})
    at_epoch = snapshots_per_epoch(solver, per_epoch=5)
    solver.train()
    best = int(np.argmax(solver.val_acc_history))  # the first maximum: improvements are strict
    assert solver.best_val_acc == solver.val_acc_history[best]
    np.testing.assert_array_equal(flat_params(solver.model), at_epoch(best))
    assert solver.flat.is_bound()  # loaded in place, still views of the flat buffer
    for k, v in solver.best_params.items():
        np.testing.assert_array_equal(v, solver.model.params[k])
        assert not np.shares_memory(v, solver.model.params[k])


def test_best_is_an_early_epoch_when_val_peaks_first():
    """Validation labels equal to the initial model's predictions: epoch 0 scores 1.0 and
    nothing later can beat it, so training ends with the initial parameters."""
    model = make_model()
    data = make_data()
    data["y_val"] = model.predict(data["X_val"])
    initial = flat_params(model)
    solver = make_solver(model, data, num_epochs=4)
    solver.train()
    assert solver.val_acc_history[0] == 1.0 and solver.best_val_acc == 1.0
    assert min(solver.val_acc_history[1:]) < 1.0  # the model did move away
    np.testing.assert_array_equal(flat_params(solver.model), initial)


@pytest.mark.parametrize("case", ["val_never_right", "zero_learning_rate", "zero_epochs"])
def test_best_params_never_empty(case):
    """The homework's Solver starts with best_val_acc = 0 and best_params = {}: when
    validation accuracy never rises above the first check it loads {} into the model.
    Here the first check always counts, so the model keeps real parameters."""
    data = make_data()
    kwargs = {}
    if case == "val_never_right":
        data["y_val"] = np.full(len(data["y_val"]), -1)  # no prediction can match
    elif case == "zero_learning_rate":
        kwargs["optim_config"] = {"learning_rate": 0.0}
    else:
        kwargs["num_epochs"] = 0
    model = make_model()
    names = list(model.params)
    initial = flat_params(model)
    solver = make_solver(model, data, **kwargs)
    assert set(solver.best_params) == set(names)  # even before train()
    solver.train()
    if case == "val_never_right":
        assert set(solver.val_acc_history) == {0.0}
    assert list(solver.model.params) == names
    assert set(solver.best_params) == set(names)
    assert solver.best_val_acc == solver.val_acc_history[0]
    np.testing.assert_array_equal(flat_params(solver.model), initial)
    assert solver.flat.is_bound()
    if case == "val_never_right":  # training did happen
        assert len(solver.loss_history) == 15


# ---------------------------------------------------------------- arguments

def test_unknown_kwargs_raise():
    with pytest.raises(ValueError, match="learning_rate_decay"):
        make_solver(learning_rate_decay=0.9)


def test_unknown_update_rule_raises():
    with pytest.raises(ValueError, match="adamw"):
        make_solver(update_rule="adamw")


def test_mismatched_lengths_raise():
    data = make_data()
    data["y_train"] = data["y_train"][:-1]
    with pytest.raises(ValueError, match="matching lengths"):
        make_solver(data=data)


def test_verbose_prints_progress(capsys):
    make_solver(verbose=True, print_every=2, num_epochs=1).train()
    out = capsys.readouterr().out
    assert "(Iteration 2 / 5) loss:" in out and "(Epoch 1 / 1" in out
