"""The lock files (requirements/*.txt) agree with pyproject.toml's ranges.

scripts/install.sh installs requirements/dev.txt, so a dependency missing from the lock or pinned
outside its range would make CI test something other than what pyproject.toml promises.
"""

import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)\s*$")


def read_pins(text: str) -> dict[str, str]:
    """``name -> version`` of a pip-compile output; any requirement line that is not ``==`` raises."""
    pins = {}
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        if match is None:
            raise ValueError(f"not an exact pin: {line!r}")
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def requirements(extras: list[str]) -> list[Requirement]:
    """The project's requirements with ``extras``, following the extras' references to the project."""
    own = canonicalize_name(PROJECT["name"])
    found, todo, seen = [Requirement(r) for r in PROJECT["dependencies"]], list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in PROJECT["optional-dependencies"][extra]:
            req = Requirement(text)
            if canonicalize_name(req.name) == own:
                todo.extend(req.extras)
            else:
                found.append(req)
    return found


def disagreements(reqs: list[Requirement], pins: dict[str, str]) -> list[str]:
    """Each requirement (whose marker holds here) that the pins leave out or pin outside its range."""
    problems = []
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req.name} is not in the lock")
        elif not req.specifier.contains(Version(pins[name]), prereleases=True):
            problems.append(f"{req.name}=={pins[name]} is outside {req}")
    return problems


LOCKS = {"dev.txt": ["dev"], "runtime.txt": []}


@pytest.mark.parametrize("lock, extras", LOCKS.items())
def test_the_lock_pins_every_requirement_within_its_range(lock, extras):
    pins = read_pins((ROOT / "requirements" / lock).read_text())
    assert disagreements(requirements(extras), pins) == []
    assert canonicalize_name(PROJECT["name"]) not in pins  # the package itself is installed from the tree


@pytest.mark.parametrize("lock", LOCKS)
def test_the_lock_keeps_the_constraints(lock):
    pins = read_pins((ROOT / "requirements" / lock).read_text())
    constraints = read_pins((ROOT / "requirements" / "constraints.in").read_text())
    assert {name: pins.get(name, version) for name, version in constraints.items()} == constraints


def test_the_check_catches_a_missing_dependency_and_a_pin_outside_its_range():
    text = (ROOT / "requirements" / "dev.txt").read_text()
    reqs = requirements(["dev"])
    without = re.sub(r"(?m)^transformers==.*$", "", text)
    assert disagreements(reqs, read_pins(without)) == ["transformers is not in the lock"]
    loosened = re.sub(r"(?m)^filelock==.*$", "filelock==4.3.1", text)
    assert disagreements(reqs, read_pins(loosened)) == ["filelock==4.3.1 is outside filelock<4.3"]
    with pytest.raises(ValueError, match="not an exact pin"):
        read_pins(text + "\nnumpy>=2\n")
