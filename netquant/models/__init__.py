"""Residual networks for CIFAR-10: builder, analysis, training and the shipped pretrained nets."""
from .resnet import ResNet, ResNetSpec, resnet

__all__ = ["ResNet", "ResNetSpec", "resnet"]
