"""Data: dataset registry, .beton preparation and FFCV loaders (the contract is in `base.py`).

The public names load their modules on first use, so importing `sparsedist.data.base` (as the
training loop does) or `sparsedist.data.memory` stays free of FFCV, numba and torchvision, which
take seconds to import.
"""

from importlib import import_module

_HOMES = {
    "DataUnavailableError": "sources",
    "PreparedPaths": "preparation",
    "build_loaders": "loaders",
    "get_spec": "registry",
    "prepare": "preparation",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
