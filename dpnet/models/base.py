"""What every dpnet model shares: parameters, regularisation, and the lineage's loss API."""

import numpy as np

from ..layers.affine import DX_FORMS, AffineProducts
from ..layers.batchnorm import init_bn_state
from ..layers.conv import conv_algorithms
from ..layers.losses import softmax_loss

BN_MODES = ("local", "sync")
CHUNK = 1 << 14  # elements per cache-sized piece in add_scaled


def add_scaled(y, x, scale):
    """y += scale * x in place, bit for bit, in cache-sized pieces: no temporary the size
    of x (a large one costs a fresh allocation and its page faults on every step)."""
    if not (y.flags.c_contiguous and x.flags.c_contiguous):  # reshape would copy: no pieces
        y += scale * x
        return
    y, x = y.reshape(-1), x.reshape(-1)
    tmp = np.empty(min(CHUNK, y.size), dtype=y.dtype)
    for start in range(0, y.size, CHUNK):
        piece = tmp[:min(CHUNK, y.size - start)]
        np.multiply(x[start:start + CHUNK], scale, out=piece)
        y[start:start + CHUNK] += piece


def init_weight(rng, shape, fan_in, weight_scale, dtype):
    """Initial weights: Gaussian with std = weight_scale, or sqrt(2 / fan_in) (He) for 'he';
    'uniform': U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default for conv and linear layers."""
    if weight_scale == "uniform":
        bound = 1 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(dtype)
    if isinstance(weight_scale, str):
        if weight_scale != "he":
            raise ValueError(f"weight_scale must be a positive number, 'he' or 'uniform', got {weight_scale!r}")
        std = np.sqrt(2.0 / fan_in)
    else:
        if not weight_scale > 0:
            raise ValueError(f"weight_scale must be a positive number, 'he' or 'uniform', got {weight_scale!r}")
        std = weight_scale
    return (std * rng.standard_normal(shape)).astype(dtype)


def init_bias(rng, size, fan_in, weight_scale, dtype):
    """Initial biases: zeros, or U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with weight_scale 'uniform'
    (PyTorch's default, drawn right after the layer's weights)."""
    if weight_scale == "uniform":
        bound = 1 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, size).astype(dtype)
    return np.zeros(size, dtype=dtype)


class _ReportingDict(dict):
    """A dict that calls on_grad(name, value) whenever an entry is stored."""

    def __init__(self, on_grad):
        super().__init__()
        self.on_grad = on_grad

    def __setitem__(self, name, value):
        super().__setitem__(name, value)
        self.on_grad(name, value)


def parse_layer_choices(choices):
    """Model.layer_choices() as JSON kept it -> (conv {layer: algorithm}, dx {weight: form})."""
    return {int(k): v for k, v in choices.get("conv", {}).items()}, dict(choices.get("dx", {}))


class Model:
    """Base class. A subclass declares its parameters with add_param (layer number, whether L2
    applies), fills `bn_params` (one dict per batchnorm layer) and implements `_forward(X) ->
    (scores, caches)` and `_backward(dscores, caches, grads)`, which stores each gradient
    into `grads[name]` once, as soon as it is final.

    A subclass also sets `num_classes`, the width of its scores.

    Keyword arguments shared by every model:
    - reg: L2 strength; the loss adds 0.5 * reg * sum(W^2) over the weights
    - dtype: dtype of every parameter; inputs are cast to it
    - bn_mode: 'local' (batch statistics of the arrays this process sees) or 'sync'
      (statistics of the global batch over the ranks of `comm`)
    - comm: communicator for bn_mode 'sync'; None means a single process
    - seed: seeds the generator for initial weights and dropout masks

    dw_factors (attribute, default False): True has backward store each affine layer's weight
    gradient as dpnet.layers.WeightGradFactors, its two factors, instead of their product (the
    reproducible mode's passes set it, dpnet.parallel.passes).
    """

    def __init__(self, reg=0.0, dtype=np.float32, bn_mode="local", comm=None, seed=0):
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        self.reg = reg
        self.dtype = np.dtype(dtype)
        self.bn_mode = bn_mode
        self.comm = comm
        self.rng = np.random.default_rng(seed)
        self.params = {}
        self._layer, self._l2 = {}, set()  # what add_param declared: layer numbers, L2 parameters
        self.bn_params = []
        self.conv_algorithms = {}  # layer -> its algorithm (CONV_ALGORITHMS), for the layers of conv_layers()
        self.dx_forms = {}  # affine weight name -> how its layer's input gradient is made (DX_FORMS)
        self.products = AffineProducts  # dx form -> how an affine layer makes its products (the strategy)
        self.dropout_param = None
        self.dw_factors = False

    def add_param(self, name, value, layer, l2=False):
        """Declare a parameter, in forward order: `layer` numbers its layer (the backward pass
        finishes layers from the highest number down); l2: the L2 term applies to it."""
        self.params[name] = value
        self._layer[name] = layer
        if l2:
            self._l2.add(name)

    def conv_layers(self):
        """The model's convolutions: (layer, input shape (C, H, W) per image, filter shape,
        conv_param) each; dpnet.autotune measures their algorithms."""
        return []

    def set_conv_algorithms(self, choices):
        """Use algorithm choices[layer] (dpnet.layers.conv.CONV_ALGORITHMS) for the layers of
        conv_layers(); each must be one that can compute its layer."""
        layers = {layer: (w_shape, param) for layer, _, w_shape, param in self.conv_layers()}
        unknown = sorted(set(choices) - set(layers))
        if unknown:
            raise ValueError(f"no convolution at layer(s) {unknown}; the model's are {sorted(layers)}")
        for layer, algorithm in choices.items():
            if algorithm not in conv_algorithms(*layers[layer]):
                raise ValueError(f"layer {layer} (filters {layers[layer][0]}, stride {layers[layer][1]['stride']}) "
                                 f"cannot be computed by {algorithm!r}: use one of {conv_algorithms(*layers[layer])}")
        self.conv_algorithms.update(choices)

    def use_conv_algorithm(self, algorithm):
        """`algorithm` for every convolution it can compute, im2col for the others."""
        self.set_conv_algorithms({layer: algorithm for layer, _, w_shape, param in self.conv_layers()
                                  if algorithm in conv_algorithms(w_shape, param)})

    def layer_conv_param(self, layer, param):
        """conv_param `param` (stride, pad) with the algorithm chosen for `layer`."""
        return {**param, "algorithm": self.conv_algorithms.get(layer, "im2col")}

    def affine_weights(self):
        """The affine layers' weights, (name, (D, M)) each: every 2-d parameter."""
        return [(name, value.shape) for name, value in self.params.items() if value.ndim == 2]

    def set_dx_forms(self, choices):
        """Make the input gradient of the affine layer of weight `name` as choices[name] (a form of
        dpnet.layers.affine.input_grad: 'plain' or 'transposed'); dpnet.autotune measures them."""
        known = {name for name, _ in self.affine_weights()}
        unknown = sorted(set(choices) - known)
        if unknown:
            raise ValueError(f"no affine weight {unknown}; the model's are {sorted(known)}")
        bad = {name: form for name, form in choices.items() if form not in DX_FORMS}
        if bad:
            raise ValueError(f"dx forms must be one of {DX_FORMS}, got {bad}")
        self.dx_forms.update(choices)

    def affine_products(self, weight):
        """How the affine layer of `weight` makes its products (dpnet.layers.affine.AffineProducts,
        or what self.products makes instead), its input gradient in the layer's dx form."""
        return self.products(self.dx_forms.get(weight, "plain"))

    def layer_choices(self):
        """How the choosable layers compute, as JSON keeps it (checkpoints):
        {"conv": {"layer": algorithm}, "dx": {weight: form}}."""
        return {"conv": {str(k): v for k, v in self.conv_algorithms.items()}, "dx": dict(self.dx_forms)}

    def set_layer_choices(self, choices):
        """The inverse of layer_choices()."""
        conv, dx = parse_layer_choices(choices)
        self.set_conv_algorithms(conv)
        self.set_dx_forms(dx)

    def add_bn_param(self, channels):
        """Append the state of one batchnorm layer over `channels` channels to bn_params."""
        self.bn_params.append({"mode": "train", **init_bn_state(channels, self.dtype)})

    @property
    def bn_comm(self):
        """The communicator batchnorm layers reduce over (None: local statistics)."""
        return self.comm if self.bn_mode == "sync" else None

    def _set_mode(self, mode):
        for bn_param in self.bn_params:
            bn_param["mode"] = mode
        if self.dropout_param is not None:
            self.dropout_param["mode"] = mode

    def _check_input(self, X):
        raise NotImplementedError

    def scores(self, X):
        """Class scores (N, num_classes) in test mode (running batchnorm statistics, no dropout)."""
        X = self._check_input(X)
        self._set_mode("test")
        scores, _ = self._forward(X)
        return scores

    def data_loss(self, X, y, batch_size=None, on_grad=None):
        """Train-mode softmax loss of (X, y) and its gradients, without regularisation.

        batch_size: the number of examples the loss is averaged over (default len(X));
        a data-parallel rank passes the global batch size so shard results sum to the
        global batch's.
        on_grad: optional callable on_grad(name, grad), called as each gradient becomes
        final during the backward pass (last layer first), so its reduction can start
        while the earlier layers are still being differentiated.
        Returns (loss, grads) with grads a dict named like params.
        """
        X = self._check_input(X)
        self._set_mode("train")
        scores, caches = self._forward(X)
        loss, dscores = softmax_loss(scores, y, batch_size)
        grads = {} if on_grad is None else _ReportingDict(on_grad)
        self._backward(dscores, caches, grads)
        return loss, {name: grads[name] for name in self.params}

    def backward_order(self):
        """Parameter names in the order the backward pass finishes them: by declared layer,
        highest first; within a layer, in declaration order."""
        return sorted(self.params, key=self._layer.__getitem__, reverse=True)

    def weight_names(self):
        """The parameters the L2 term applies to, as declared (the weights)."""
        return [name for name in self.params if name in self._l2]

    def regularization_loss(self):
        """0.5 * reg * sum(W^2) over the weights."""
        if not self.reg:
            return 0.0
        return 0.5 * self.reg * sum(float(np.vdot(self.params[name], self.params[name]))
                                    for name in self.weight_names())

    def add_regularization(self, grads):
        """Add reg * W to the weights' gradients in place; return 0.5 * reg * sum(W^2)."""
        if not self.reg:
            return 0.0
        for name in self.weight_names():
            add_scaled(grads[name], self.params[name], self.reg)
        return self.regularization_loss()

    def loss(self, X, y=None):
        """The homework API with two meanings:
        - loss(X) returns class scores (N, num_classes), test mode;
        - loss(X, y) returns (loss, grads): mean softmax loss plus L2, and its gradients.
        """
        if y is None:
            return self.scores(X)
        data_loss, grads = self.data_loss(X, y)
        return data_loss + self.add_regularization(grads), grads

    def predict(self, X, batch_size=256):
        """Predicted labels (N,), computed in test mode in chunks of batch_size."""
        X = np.asarray(X)
        chunks = [self.scores(X[i:i + batch_size]).argmax(axis=1) for i in range(0, len(X), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
