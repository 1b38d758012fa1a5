"""Transition: the names modules not yet moved still import from here; the rest of the project imports
`flcore.datasets` (loading) and `flcore.batches` (batching) directly. Removed once `server_app.preflight`,
`flcore.class_statistics` and the distillation strategies import from those modules.
"""

from flcore.batches import Batches
from flcore.datasets import DataNotFound, ImageSet, load
from flcore.images import IMAGE_SUFFIXES

__all__ = ["IMAGE_SUFFIXES", "Batches", "DataNotFound", "ImageSet", "load"]
