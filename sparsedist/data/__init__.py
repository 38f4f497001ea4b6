"""Data: dataset registry, .beton preparation and FFCV loaders (the contract is in `base.py`)."""

from sparsedist.data.loaders import build_loaders
from sparsedist.data.prepare import PreparedPaths, prepare
from sparsedist.data.registry import get_spec
from sparsedist.data.sources import DataUnavailableError

__all__ = ["DataUnavailableError", "PreparedPaths", "build_loaders", "get_spec", "prepare"]
