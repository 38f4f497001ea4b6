"""Which optional dependency groups (pyproject's extras) are installed.

The core package holds configs, the method, `load_model` and the exported program; training, sweeps,
reports and tracking each need an extra. The lists are read from the installed package's metadata, so
pyproject.toml stays their one source.
"""

from __future__ import annotations

import importlib.metadata
import json
from urllib.parse import unquote, urlsplit

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PACKAGE = "sparsedist"


class MissingExtraError(Exception):
    """A feature's extra is not installed; the message says what to install."""

    def __init__(self, feature: str, extra: str, missing: list[str]):
        self.extra = extra
        super().__init__(f"{feature} needs the [{extra}] extra, which is not fully installed ({'; '.join(missing)}); "
                         f"install it with: pip install '{_install_source()}[{extra}]'")


def _install_source() -> str:
    """What pip installed this package from: the checkout's path for a local (or editable) install, else its name."""
    try:
        origin = json.loads(importlib.metadata.distribution(PACKAGE).read_text("direct_url.json") or "{}")
    except importlib.metadata.PackageNotFoundError:
        return PACKAGE
    url = urlsplit(origin.get("url", ""))
    return unquote(url.path) if url.scheme == "file" and "dir_info" in origin else PACKAGE


def _requirements(extra: str) -> list[Requirement]:
    """The requirements `extra` lists, following `sparsedist[...]` self-references."""
    lines = [Requirement(line) for line in importlib.metadata.requires(PACKAGE) or []]
    found, pending, seen = [], [extra], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for requirement in lines:
            if requirement.marker is None or not requirement.marker.evaluate({"extra": current}):
                continue
            if canonicalize_name(requirement.name) == PACKAGE:
                pending.extend(requirement.extras)
            else:
                found.append(requirement)
    return found


def _unmet(requirement: Requirement) -> list[str]:
    """What keeps an installed environment from meeting `requirement`: the distribution itself, its version,
    or the distributions its own extras ask for (`ray[tune]` with bare `ray` installed)."""
    extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
    wanted = f"{requirement.name}{extras}{requirement.specifier}"  # without its `extra == ...` marker
    try:
        distribution = importlib.metadata.distribution(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        return [wanted]
    version = distribution.version
    if not requirement.specifier.contains(version, prereleases=True):
        return [f"{wanted} ({version} is installed)"]
    unmet = []
    for extra in sorted(requirement.extras):
        for line in distribution.requires or []:
            needed = Requirement(line)
            if needed.marker is not None and needed.marker.evaluate({"extra": extra}):
                try:
                    importlib.metadata.distribution(needed.name)
                except importlib.metadata.PackageNotFoundError:
                    unmet.append(f"{needed.name} (for {requirement.name}[{extra}])")
    return unmet


def missing_distributions(extra: str) -> list[str]:
    """What `extra` needs that is not installed, or not at a version it accepts (empty when all is there, or
    when running from a bare source tree)."""
    try:
        requirements = _requirements(extra)
    except importlib.metadata.PackageNotFoundError:
        return []
    return sorted({problem for requirement in requirements for problem in _unmet(requirement)})


def require(extra: str, feature: str) -> None:
    """Raise MissingExtraError naming `extra` unless every distribution it lists is installed at a version it accepts."""
    missing = missing_distributions(extra)
    if missing:
        raise MissingExtraError(feature, extra, missing)
