"""`from fastdelta.utils.visualization import Visualization`, OpenDelta's import path."""

from fastdelta.visualization import Visualization

__all__ = ["Visualization"]
