"""The network core: layers, activations, losses and ``Sequential`` over one flat parameter vector."""
from daskbelief.nn.activations import ACTIVATIONS, get_activation
from daskbelief.nn.layers import (Dense, Layer, LocallyConnected1D, LocallyConnected2D, layer_from_dict,
                                  patches, receptive_field)
from daskbelief.nn.losses import LOSSES, get_loss
from daskbelief.nn.model import ParamSpec, Sequential

__all__ = ["ACTIVATIONS", "LOSSES", "Dense", "Layer", "LocallyConnected1D", "LocallyConnected2D",
           "ParamSpec", "Sequential", "get_activation", "get_loss", "layer_from_dict", "patches",
           "receptive_field"]
