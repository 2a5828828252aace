"""
CNN trunks: torchvision classifiers with their pooling and classifier heads removed.

Weights never come from the network (robots and CI machines often have none): a pretrained
trunk is loaded from a local torchvision state-dict file, the file torchvision itself would
download. Without one the trunk is randomly initialised, and the log says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
import logging
import os
from typing import Callable

import torch
from torch import nn
import torchvision

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """How to cut a torchvision classifier down to its convolutional trunk."""

    channels: int
    trunk: Callable[[nn.Module], nn.Module]


def _resnet_trunk(net: nn.Module) -> nn.Module:
    # Everything up to layer4: drops the global average pool and the fc layer.
    return nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool,
        net.layer1, net.layer2, net.layer3, net.layer4)


def _features_trunk(net: nn.Module) -> nn.Module:
    return net.features


BACKBONES: dict[str, BackboneSpec] = {
    'resnet18': BackboneSpec(512, _resnet_trunk),
    'resnet34': BackboneSpec(512, _resnet_trunk),
    'resnet50': BackboneSpec(2048, _resnet_trunk),
    'mobilenet_v3_small': BackboneSpec(576, _features_trunk),
    'mobilenet_v3_large': BackboneSpec(960, _features_trunk),
    'efficientnet_b0': BackboneSpec(1280, _features_trunk),
    'vgg16': BackboneSpec(512, _features_trunk),
}


def check_backbone_name(name: str) -> BackboneSpec:
    """Return the spec of a supported backbone, or raise ValueError listing the choices."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(
            f'backbone {name!r} is not supported; choose one of '
            f'{", ".join(sorted(BACKBONES))}') from None


def weights_url(name: str) -> str:
    """Return where torchvision publishes the ImageNet weights file for a backbone."""
    return torchvision.models.get_model_weights(name).DEFAULT.url


def build_trunk(name: str, weights_path: str | os.PathLike | None = None) -> nn.Module:
    """
    Build a backbone's trunk, loading a local torchvision state dict when one is named.

    The file is the whole classifier's state dict (as torchvision publishes it); it is loaded
    strictly into the full model before the head is cut off, so a file for another architecture
    is rejected rather than half-loaded.
    """
    spec = check_backbone_name(name)
    net = torchvision.models.get_model(name, weights=None)
    if weights_path:
        net.load_state_dict(load_torchvision_state_dict(name, weights_path))
        _LOG.info('backbone %s: pretrained weights from %s', name, weights_path)
    return spec.trunk(net)


def first_convolution(trunk: nn.Module) -> tuple[str, nn.Conv2d]:
    """Return the name and module of the convolution that reads the image."""
    for name, module in trunk.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError('the trunk has no convolution')


def widen_first_convolution(trunk: nn.Module, channels: int) -> None:
    """
    Let ``trunk`` read ``channels`` input channels: the image's three, then more.

    The new channels' weights start at zero, so the trunk computes what it did (pretrained
    weights keep their meaning) and training grows what the extra channels add.
    """
    name, old = first_convolution(trunk)
    new = nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    old.dilation, old.groups, old.bias is not None, old.padding_mode)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old.in_channels] = old.weight
        if old.bias is not None:
            new.bias.copy_(old.bias)
    parent, _, attribute = name.rpartition('.')
    setattr(trunk.get_submodule(parent) if parent else trunk, attribute, new)


def load_torchvision_state_dict(name: str, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a torchvision weights file and check it fits the backbone; errors say how to fix."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'pretrained weights for {name} not found at {path!r}; download '
            f'{weights_url(name)} on a machine with network access and pass its path, '
            'or leave the weights path empty for a randomly initialised trunk')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # torch raises several types for unreadable files
        raise ValueError(f'cannot read weights file {path!r}: {error}') from error
    if not isinstance(state, dict):
        raise ValueError(f'weights file {path!r} holds a {type(state).__name__}, '
                         'not a torchvision state dict')
    expected = torchvision.models.get_model(name, weights=None).state_dict()
    differences = state_dict_differences(expected, state)
    if differences:
        raise ValueError(f'weights file {path!r} does not fit backbone {name}: {differences}')
    return state


def state_dict_differences(expected: dict[str, torch.Tensor],
                           actual: dict[str, torch.Tensor], *, limit: int = 5) -> str:
    """Describe missing, unexpected and wrongly shaped tensors; empty when the two match."""
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    reshaped = [
        f'{key} {tuple(actual[key].shape)} (expected {tuple(expected[key].shape)})'
        for key in sorted(set(expected) & set(actual))
        if tuple(expected[key].shape) != tuple(actual[key].shape)]
    parts = []
    for title, items in (('missing', missing), ('unexpected', unexpected),
                         ('wrong shape', reshaped)):
        if items:
            shown = ', '.join(items[:limit])
            more = f' and {len(items) - limit} more' if len(items) > limit else ''
            parts.append(f'{len(items)} {title}: {shown}{more}')
    return '; '.join(parts)


@lru_cache(maxsize=64)
def feature_map_size(name: str, input_size: tuple[int, int]) -> tuple[int, int]:
    """
    Return the trunk's output (height, width) for an input size, without computing anything.

    The trunk is built and run on the meta device, so this costs no memory or arithmetic.
    """
    check_backbone_name(name)
    with torch.device('meta'):
        trunk = BACKBONES[name].trunk(torchvision.models.get_model(name, weights=None))
        # Eval mode: in training mode BatchNorm refuses a 1x1 map of a single image.
        out = trunk.eval()(torch.empty(1, 3, *input_size))
    return int(out.shape[2]), int(out.shape[3])
