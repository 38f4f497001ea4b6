"""Data: dataset registry, .beton preparation and FFCV loaders (the contract is in `base.py`)."""

from sparsedist.data.loaders import build_loaders
from sparsedist.data.prepare import PreparedPaths, prepare
from sparsedist.data.registry import KNOWN_DATASETS, get_spec
from sparsedist.data.sources import DataUnavailableError

__all__ = ["DataUnavailableError", "KNOWN_DATASETS", "PreparedPaths", "build_loaders", "get_spec", "prepare"]
