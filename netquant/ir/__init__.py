"""The float graph IR: capture from torch, passes, and a float executor."""
from .capture import CaptureError, capture
from .graph import Graph, Node

__all__ = ["CaptureError", "capture", "Graph", "Node"]
