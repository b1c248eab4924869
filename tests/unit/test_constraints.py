"""constraints.txt, the releases that `make serve` and `make test` install, against what
pyproject.toml declares: a range moved in one and not the other fails here, not on a user's
fresh machine."""

import tomllib
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _pinned_lines() -> list[str]:
    text = (ROOT / "constraints.txt").read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def _pins() -> dict[NormalizedName, Version]:
    pins = {}
    for line in _pinned_lines():
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        pins[canonicalize_name(requirement.name)] = Version(specifier.version)
    return pins


def _declared() -> list[Requirement]:
    """Tandem's own requirements, of every extra, less its references to itself."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = [project["dependencies"], *project["optional-dependencies"].values()]
    requirements = (Requirement(line) for group in groups for line in group)
    return [r for r in requirements if canonicalize_name(r.name) != "tandem"]


def _needed(roots: Iterable[Requirement]) -> set[NormalizedName]:
    """Every distribution that `roots` bring in, as installed here, markers and extras
    weighed for this interpreter; one not installed here (torch, left out of a run on
    another Python) counts, without what it would bring in."""
    names: set[NormalizedName] = set()
    seen: set[tuple[NormalizedName, frozenset[str]]] = set()
    todo = list(roots)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        names.add(name)
        try:
            requires = metadata.requires(requirement.name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            dependency = Requirement(line)
            marker = dependency.marker
            extras = requirement.extras or {""}
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(dependency)
    return names


def test_each_pin_is_one_release_that_any_index_may_hold() -> None:
    for line in _pinned_lines():
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", line
        # A local label (torch's +cpu) names a build that PyPI does not hold.
        assert Version(specifier.version).local is None, line
        assert requirement.url is None, line
        assert not requirement.extras, line
        assert requirement.marker is None, line


def test_every_declared_requirement_is_pinned_within_its_range() -> None:
    pins = _pins()
    outside = {
        str(r): str(pins.get(canonicalize_name(r.name)))
        for r in _declared()
        if canonicalize_name(r.name) not in pins
        or not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)
    }
    assert not outside, f"run scripts/lock: {outside}"


def test_everything_the_requirements_bring_in_is_pinned() -> None:
    unpinned = _needed(_declared()) - _pins().keys()
    assert not unpinned, f"run scripts/lock: {sorted(unpinned)} would install unpinned"
