"""The exported model directory: file names, the config.json format version, and its errors.

Layout (the timm / Hugging Face hub convention): `model.safetensors` (the network's weights only),
`config.json` (architecture, input spec, regimes, provenance), `README.md` (a model card) and,
with `--program`, `model.pt2` (a torch.export program taking images and rho).
"""

from __future__ import annotations

import json
import os
from typing import Any

FORMAT_VERSION = 1  # bump when config.json changes meaning; loaders refuse versions they do not know
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
PROGRAM_FILE = "model.pt2"


class ArtifactError(ValueError):
    """An exported model (or a request to it) that cannot be used; names the offending field."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


def check_keep_ratio(keep_ratio: float) -> float:
    if not 0.0 < keep_ratio <= 1.0:
        raise ArtifactError("keep_ratio", f"must be in (0, 1], got {keep_ratio}")
    return float(keep_ratio)


def read_config(directory: str) -> dict[str, Any]:
    """config.json of an exported model, refused when missing, unreadable or of an unknown format version."""
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise ArtifactError(CONFIG_FILE, f"cannot read {path}: {error}") from None
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError("format_version", f"{path} has format_version {version!r}; this sparsedist reads "
                                              f"{FORMAT_VERSION} (export the checkpoint again, or use a matching sparsedist)")
    return config
