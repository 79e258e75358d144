"""The dependency lock: refresh it from pyproject.toml, check that the two agree, check a venv against it.

    python infra/lock.py refresh     # add/remove what pyproject.toml changed, keep every other pin
    python infra/lock.py refresh --upgrade   # re-resolve everything to the newest versions allowed
    python infra/lock.py check       # every pyproject requirement is locked, at a version it allows
    python infra/lock.py installed   # the running interpreter has exactly the locked versions

`requirements-dev.lock` is the full set (runtime + `dev` extra) that CI and developers install;
`requirements.lock` is the runtime subset at the same versions, for images and Ray runtime envs. Both are
for Linux x86-64, CPython 3.11, with sha256 hashes (`pip install --require-hashes`). `pyproject.toml` keeps
ranges: it is what a library user installs against. `check` needs only `packaging` (in the lock); `refresh`
needs uv (in the dev lock).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_LOCK = "requirements.lock"
DEV_LOCK = "requirements-dev.lock"
EXTRAS = ("dev",)
PINS_FILE = ".dev-lock-pins.txt"  # transient, during `refresh`
PLATFORM = ("--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28")
# Installers and the project itself are not locked: pip/setuptools/wheel come with the venv.
UNLOCKED = {"pip", "setuptools", "wheel", "eagle-audit"}

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)")


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(lock: Path) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line in a lock file."""
    pins = {}
    for line in lock.read_text().splitlines():
        m = _PIN.match(line)
        if m:
            pins[canonical(m.group(1))] = m.group(3)
    return pins


def requirements(pyproject: Path, extras: tuple[str, ...]) -> list[Requirement]:
    """The project's dependencies and those of the given extras, for Linux x86-64 / CPython 3.11."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = [Requirement(r) for r in project.get("dependencies", [])]
    for extra in extras:
        reqs += [Requirement(r) for r in project.get("optional-dependencies", {}).get(extra, [])]
    env = {"python_version": "3.11", "sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def check(pyproject: Path, lock: Path, extras: tuple[str, ...]) -> list[str]:
    """Problems between pyproject.toml and a lock: requirements missing from the lock or locked out of range."""
    pins = read_pins(lock)
    problems = []
    for req in requirements(pyproject, extras):
        name = canonical(req.name)
        if name not in pins:
            problems.append(f"{req} is required by {pyproject.name} but not in {lock.name}")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req} is required by {pyproject.name} but {lock.name} has {name}=={pins[name]}")
    return problems


def check_all(root: Path, pyproject: Path) -> list[str]:
    """`check` for both locks, plus: the runtime lock pins the same versions as the dev lock."""
    dev, runtime = read_pins(root / DEV_LOCK), read_pins(root / RUNTIME_LOCK)
    problems = check(pyproject, root / DEV_LOCK, EXTRAS) + check(pyproject, root / RUNTIME_LOCK, ())
    problems += [f"{n}: {RUNTIME_LOCK} has {v}, {DEV_LOCK} has {dev.get(n, '-')}"
                 for n, v in runtime.items() if dev.get(n) != v]
    return problems


def installed_diff(lock: Path) -> list[str]:
    """Differences between the running environment and a lock (``pip freeze`` against the pins)."""
    pins = read_pins(lock)
    have = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    diff = []
    for name in sorted(set(pins) | set(have) - UNLOCKED):
        want, got = pins.get(name), have.get(name)
        if want != got:
            diff.append(f"{name}: locked {want or '-'}, installed {got or '-'}")
    return diff


def refresh(root: Path = ROOT, upgrade: bool = False) -> None:
    """Re-resolve both locks with uv from pyproject.toml (needs the registry). Existing pins are kept unless
    ``upgrade``; the runtime lock always takes the dev lock's versions."""
    uv = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
    if uv is None:
        raise SystemExit("lock: uv not found; `pip install -r requirements-dev.lock` brings it (or `pip install uv`)")
    common = ["--generate-hashes", "--custom-compile-command", "python infra/lock.py refresh", *PLATFORM]
    run = lambda *args: subprocess.run([uv, "pip", "compile", "--quiet", *args], cwd=root, check=True)  # noqa: E731
    extras = [a for e in EXTRAS for a in ("--extra", e)]
    run("pyproject.toml", *extras, *common, *(["--upgrade"] if upgrade else []), "-o", DEV_LOCK)
    # The runtime lock takes the dev lock's versions. The pins file has a fixed name, so the lock's
    # "via -c" annotations do not change from one refresh to the next.
    pins = root / PINS_FILE
    pins.write_text("".join(f"{n}=={v}\n" for n, v in read_pins(root / DEV_LOCK).items()))
    try:
        run("pyproject.toml", *common, "--constraint", PINS_FILE, "-o", RUNTIME_LOCK)
    finally:
        pins.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["refresh", "check", "installed"])
    ap.add_argument("--upgrade", action="store_true", help="for `refresh`: move every pin to the newest allowed")
    ap.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    ap.add_argument("--lock", type=Path, default=ROOT / DEV_LOCK, help="for `installed`: the lock to compare")
    args = ap.parse_args(argv)
    if args.command == "refresh":
        refresh(upgrade=args.upgrade)
        return 0
    if args.command == "check":
        problems = check_all(args.pyproject.parent, args.pyproject)
        what = f"{args.pyproject.name} and the lock files disagree"
    else:
        problems = installed_diff(args.lock)
        what = f"the environment differs from {args.lock.name}"
    for p in problems:
        print(f"lock: {p}", file=sys.stderr)
    if problems:
        print(f"lock: {what}. Run `python infra/lock.py refresh` and commit both lock files.", file=sys.stderr)
        return 1
    print(f"lock: {args.command} ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
