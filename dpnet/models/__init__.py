"""Models with the CS231n interface: `params` dict, `loss(X, y) -> (loss, grads)`, `loss(X) -> scores`."""

from .base import Model
from .cnn import ThreeLayerConvNet
from .convnet import ConvNet
from .fc_net import FullyConnectedNet
from .resnet import ResNet

__all__ = ["Model", "ThreeLayerConvNet", "ConvNet", "FullyConnectedNet", "ResNet"]
