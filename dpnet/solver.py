"""Single-process training loop in the CS231n Solver's shape."""

import numpy as np

from .flat import FlatParams
from .optim import apply_update, get_update_rule


class Solver:
    """Trains a model with minibatch gradient descent.

    Usage, as in the homework:
        solver = Solver(model, {'X_train': ..., 'y_train': ..., 'X_val': ..., 'y_val': ...},
                        update_rule='adam', optim_config={'learning_rate': 1e-3},
                        lr_decay=0.95, batch_size=100, num_epochs=10)
        solver.train()   # model.params end as the best-validation parameters

    Each epoch visits every training example once, in the order of a permutation drawn
    from a generator seeded with `seed` (minibatches without replacement; the last one
    may be smaller). Every parameter lives in one flat buffer (dpnet.flat.FlatParams)
    and the update rule runs once per step over all of them. After each epoch the
    learning rate is multiplied by lr_decay and accuracies are recorded.

    Keyword arguments: update_rule (name in dpnet.optim.UPDATE_RULES or a callable
    `next_w, config = rule(w, dw, config)`; a next_w other than w is copied into w, and the
    returned config is the one passed next time),
    optim_config, lr_decay (1.0), batch_size (100), num_epochs (10), seed (0),
    num_train_samples (1000; examples used for train accuracy, None for all),
    num_val_samples (None: all), print_every (100 iterations), verbose (True).

    Attributes after train(): loss_history, train_acc_history, val_acc_history,
    best_val_acc, best_params (a copy, never empty).
    """

    def __init__(self, model, data, **kwargs):
        self.model = model
        self.X_train, self.y_train = data["X_train"], data["y_train"]
        self.X_val, self.y_val = data["X_val"], data["y_val"]
        if len(self.X_train) != len(self.y_train) or len(self.X_val) != len(self.y_val):
            raise ValueError("X_train/y_train and X_val/y_val must have matching lengths, got "
                             f"{len(self.X_train)}/{len(self.y_train)} and {len(self.X_val)}/{len(self.y_val)}")
        self.update_rule = get_update_rule(kwargs.pop("update_rule", "sgd"))
        self.optim_config = dict(kwargs.pop("optim_config", {}))
        self.lr_decay = kwargs.pop("lr_decay", 1.0)
        self.batch_size = kwargs.pop("batch_size", 100)
        self.num_epochs = kwargs.pop("num_epochs", 10)
        self.seed = kwargs.pop("seed", 0)
        self.num_train_samples = kwargs.pop("num_train_samples", 1000)
        self.num_val_samples = kwargs.pop("num_val_samples", None)
        self.print_every = kwargs.pop("print_every", 100)
        self.verbose = kwargs.pop("verbose", True)
        if kwargs:
            raise ValueError(f"unrecognized arguments {sorted(kwargs)}")
        if self.batch_size < 1 or len(self.X_train) < 1:
            raise ValueError(f"need batch_size >= 1 and training data, got batch_size {self.batch_size} "
                             f"and {len(self.X_train)} training examples")
        self.rng = np.random.default_rng(self.seed)
        self.flat = FlatParams(model.params)
        self.epoch = 0
        self.best_val_acc = -1.0
        self.best_params = {k: v.copy() for k, v in model.params.items()}
        self.loss_history, self.train_acc_history, self.val_acc_history = [], [], []

    def _step(self, idx):
        model = self.model
        loss, grads = model.loss(self.X_train[idx], self.y_train[idx])
        self.loss_history.append(loss)
        self.optim_config = apply_update(self.update_rule, self.flat.data, self.flat.pack_grads(grads),
                                         self.optim_config)

    def check_accuracy(self, X, y, num_samples=None, batch_size=100):
        """Fraction of correct predictions on (a seeded subsample of num_samples of) X, y."""
        if num_samples is not None and len(X) > num_samples:
            idx = self.rng.choice(len(X), num_samples, replace=False)
            X, y = X[idx], y[idx]
        if len(X) == 0:
            return float("nan")
        return float(np.mean(self.model.predict(X, batch_size) == y))

    def _record_accuracy(self, iteration, total):
        train_acc = self.check_accuracy(self.X_train, self.y_train, self.num_train_samples)
        val_acc = self.check_accuracy(self.X_val, self.y_val, self.num_val_samples)
        self.train_acc_history.append(train_acc)
        self.val_acc_history.append(val_acc)
        if self.verbose:
            print(f"(Epoch {self.epoch} / {self.num_epochs}, iteration {iteration} / {total}) "
                  f"train acc: {train_acc:.3f}; val acc: {val_acc:.3f}")
        if val_acc > self.best_val_acc:
            self.best_val_acc = val_acc
            self.best_params = {k: v.copy() for k, v in self.model.params.items()}

    def train(self):
        """Run num_epochs epochs, then load the best-validation parameters into the model."""
        n = len(self.X_train)
        per_epoch = -(-n // self.batch_size)
        total = self.num_epochs * per_epoch
        it = 0
        self._record_accuracy(it, total)
        for _ in range(self.num_epochs):
            order = self.rng.permutation(n)
            for start in range(0, n, self.batch_size):
                self._step(order[start:start + self.batch_size])
                it += 1
                if self.verbose and it % self.print_every == 0:
                    print(f"(Iteration {it} / {total}) loss: {self.loss_history[-1]:.6f}")
                if not np.isfinite(self.loss_history[-1]):
                    raise FloatingPointError(f"loss became {self.loss_history[-1]} at iteration {it}")
            self.epoch += 1
            if "learning_rate" in self.optim_config:  # set by the rule's defaults on its first call
                self.optim_config["learning_rate"] *= self.lr_decay
            self._record_accuracy(it, total)
        for name, best in self.best_params.items():
            self.model.params[name][...] = best
