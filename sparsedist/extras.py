"""Which optional dependency groups (pyproject's extras) are installed.

The core package holds configs, the method, `load_model` and the exported program; training, sweeps,
reports and tracking each need an extra. The lists are read from the installed package's metadata, so
pyproject.toml stays their one source.
"""

from __future__ import annotations

import importlib.metadata
import json
from urllib.parse import unquote, urlsplit

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

PACKAGE = "sparsedist"


class MissingExtraError(Exception):
    """A feature's extra is not installed; the message says what to install."""

    def __init__(self, feature: str, extra: str, unmet: list[str]):
        self.extra = extra
        super().__init__(f"{feature} needs the [{extra}] extra, which is not fully installed ({'; '.join(unmet)}); "
                         f"install it with: pip install '{_install_source()}[{extra}]'")


def _install_source() -> str:
    """What pip installed this package from: the checkout's path for a local (or editable) install, else its name."""
    try:
        origin = json.loads(importlib.metadata.distribution(PACKAGE).read_text("direct_url.json") or "{}")
    except importlib.metadata.PackageNotFoundError:
        return PACKAGE
    url = urlsplit(origin.get("url", ""))
    return unquote(url.path) if url.scheme == "file" and "dir_info" in origin else PACKAGE


def _parsed(lines: list[str] | None) -> list[Requirement]:
    """Requirement lines of installed metadata; a line packaging cannot read is not ours to judge."""
    parsed = []
    for line in lines or []:
        try:
            parsed.append(Requirement(line))
        except InvalidRequirement:
            pass
    return parsed


def _in_extra(requirement: Requirement, extra: str) -> bool:
    """Whether `extra` asks for `requirement` here: its marker holds with that extra and not without one."""
    marker = requirement.marker
    return marker is not None and marker.evaluate({"extra": extra}) and not marker.evaluate({"extra": ""})


def _requirements(extra: str) -> list[Requirement]:
    """The requirements `extra` lists, following `sparsedist[...]` self-references."""
    lines = _parsed(importlib.metadata.requires(PACKAGE))
    found, pending, seen = [], [extra], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for requirement in lines:
            if not _in_extra(requirement, current):
                continue
            if canonicalize_name(requirement.name) == PACKAGE:
                pending.extend(requirement.extras)
            else:
                found.append(requirement)
    return found


def _unmet(requirement: Requirement, seen: frozenset[tuple[str, str]] = frozenset()) -> list[str]:
    """What keeps this environment from meeting `requirement`: the distribution missing, its version, or what
    its own extras ask for, checked the same way (`pandas (for ray[tune])` with bare `ray` installed)."""
    extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
    wanted = f"{requirement.name}{extras}{requirement.specifier}"  # without its `extra == ...` marker
    try:
        distribution = importlib.metadata.distribution(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        return [wanted]
    if not requirement.specifier.contains(distribution.version, prereleases=True):
        return [f"{wanted} ({distribution.version} is installed)"]
    unmet, its_requirements = [], _parsed(distribution.requires)
    for extra in sorted(requirement.extras):
        key = (canonicalize_name(requirement.name), extra)
        if key in seen:  # extras that name each other
            continue
        for needed in its_requirements:
            if _in_extra(needed, extra):
                unmet += [f"{problem} (for {requirement.name}[{extra}])" for problem in _unmet(needed, seen | {key})]
    return unmet


def unmet_requirements(extra: str) -> list[str]:
    """What `extra` needs that is not installed, or not at a version it accepts (empty when all is there, or
    when running from a bare source tree)."""
    try:
        requirements = _requirements(extra)
    except importlib.metadata.PackageNotFoundError:
        return []
    return sorted({problem for requirement in requirements for problem in _unmet(requirement)})


def require(extra: str, feature: str) -> None:
    """Raise MissingExtraError naming `extra` unless every distribution it lists is installed at a version it accepts."""
    unmet = unmet_requirements(extra)
    if unmet:
        raise MissingExtraError(feature, extra, unmet)
