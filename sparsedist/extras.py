"""Which optional dependency groups (pyproject's extras) are installed.

The core package holds configs, the method, `load_model` and the exported program; training, sweeps,
reports and tracking each need an extra. The lists are read from the installed package's metadata, so
pyproject.toml stays their one source.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from urllib.parse import unquote, urlsplit

PACKAGE = "sparsedist"
_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


class MissingExtraError(Exception):
    """A feature's extra is not installed; the message says what to install."""

    def __init__(self, feature: str, extra: str, missing: list[str]):
        self.extra = extra
        super().__init__(f"{feature} needs the [{extra}] extra, which is not installed (missing: {', '.join(missing)}); "
                         f"install it with: pip install '{_install_source()}[{extra}]'")


def _install_source() -> str:
    """What pip installed this package from: the checkout's path for a local (or editable) install, else its name."""
    try:
        origin = json.loads(importlib.metadata.distribution(PACKAGE).read_text("direct_url.json") or "{}")
    except importlib.metadata.PackageNotFoundError:
        return PACKAGE
    url = urlsplit(origin.get("url", ""))
    return unquote(url.path) if url.scheme == "file" and "dir_info" in origin else PACKAGE


def _requirements(extra: str) -> list[str]:
    """The distributions `extra` asks for, following `sparsedist[...]` self-references. Markers are read
    only for their `extra == "..."`: pyproject's extras carry no other condition."""
    lines = importlib.metadata.requires(PACKAGE) or []
    found, pending, seen = [], [extra], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for line in lines:
            spec, _, marker = line.partition(";")
            marker_extra = _EXTRA_MARKER.search(marker)
            if not marker_extra or marker_extra.group(1) != current:
                continue
            name, extras = _NAME.match(spec).groups()
            if re.sub(r"[-_.]+", "-", name).lower() == PACKAGE:
                pending.extend(part.strip() for part in (extras or "").split(","))
            else:
                found.append(name)
    return found


def missing_distributions(extra: str) -> list[str]:
    """Distributions `extra` needs that are not installed (empty when it is, or when running from a bare source tree)."""
    try:
        requirements = _requirements(extra)
    except importlib.metadata.PackageNotFoundError:
        return []
    missing = []
    for name in requirements:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return sorted(set(missing))


def require(extra: str, feature: str) -> None:
    """Raise MissingExtraError naming `extra` unless every distribution it lists is installed."""
    missing = missing_distributions(extra)
    if missing:
        raise MissingExtraError(feature, extra, missing)
