"""The pinned installs: requirements/lock.txt covers every requirement, and the environment the
tests run in holds exactly the locked versions (scripts/setup.sh installs from the lock)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

REQ = Path(__file__).resolve().parents[1] / "requirements"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.lower())


def pins(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[norm(name.split("[", 1)[0])] = version.strip()
    return out


def names(path: Path) -> set[str]:
    out = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(norm(re.split(r"[\[<>=!~; ]", line, maxsplit=1)[0]))
    return out


def test_lock_pins_every_requirement_and_torch_as_setup_installs_it() -> None:
    lock = pins(REQ / "lock.txt")
    wanted = names(REQ / "base.txt") | names(REQ / "dev.txt") | names(REQ / "torch.txt")
    assert wanted - set(lock) == set()
    assert (lock["torch"], lock["torchvision"]) == ("2.14.1", "0.29.1")
    assert pins(REQ / "torch.txt") == {"torch": "2.14.1", "torchvision": "0.29.1"}


def test_installed_versions_are_the_locked_ones() -> None:
    lock = pins(REQ / "lock.txt")
    installed = {norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {n: (v, installed.get(n)) for n, v in lock.items() if installed.get(n) != v}
    assert not wrong, f"installed != lock (run bash scripts/setup.sh): {wrong}"
