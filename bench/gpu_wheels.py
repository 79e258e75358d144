"""The wheels a bare GPU machine needs, from the runtime lock: every package of ``requirements.lock`` except the
ones its image already has (torch and its CUDA stack by default), with their hashes.

    python bench/gpu_wheels.py requirements.lock > .whl/requirements.gpu.txt            # filtered lock
    python bench/gpu_wheels.py requirements.lock --skip 'torch,torchvision,triton,nvidia-*,cuda-*'
    python bench/gpu_wheels.py requirements.lock --pins > .whl/pins.txt                  # name==version only

``--dev-lock requirements-dev.lock`` adds the test runner (pytest, pluggy, iniconfig, pytest-timeout) at the dev
lock's pins, so the GPU machine can run the CUDA tests.

`bench/gpu.sh --fetch` downloads them into .whl/ here (``pip download --require-hashes``: the lock's hashes are
checked there) and writes SHA256SUMS; on the GPU machine `bench/gpu.sh` checks the sums and installs them with
``pip install --no-index --find-links .whl --no-deps -r .whl/pins.txt`` (pins: a wheel built here from an sdist,
such as freia's, has no hash in the lock).
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import sys

# What the GPU image has (torch and its CUDA libraries); pip must not replace them with the lock's CPU/CUDA build.
DEFAULT_SKIP = "torch,torchvision,triton,nvidia-*,cuda-*"


def requirement_blocks(text: str) -> list[tuple[str, str]]:
    """(normalised name, the requirement with its --hash lines) per package of a pip-compile/uv lock."""
    blocks: list[tuple[str, str]] = []
    current: list[str] = []
    for line in text.splitlines():
        if re.match(r"^[A-Za-z0-9]", line):  # a new requirement: "name==version \\"
            if current:
                blocks.append(_named(current))
            current = [line]
        elif current and line.strip().startswith("--hash"):
            current.append(line)
        elif current and not line.strip():
            blocks.append(_named(current))
            current = []
    if current:
        blocks.append(_named(current))
    return blocks


def _named(lines: list[str]) -> tuple[str, str]:
    name = re.split(r"[=<>!~;\[ ]", lines[0], maxsplit=1)[0]
    last = lines[-1].rstrip().removesuffix("\\").rstrip()
    return re.sub(r"[-_.]+", "-", name).lower(), "\n".join([*lines[:-1], last])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock")
    parser.add_argument("--skip", default=DEFAULT_SKIP, help="comma-separated names (globs) the GPU image has")
    parser.add_argument("--dev-lock", default=None, help="also take --dev-names from this lock")
    parser.add_argument("--dev-names", default="pytest,pluggy,iniconfig,pytest-timeout")
    parser.add_argument("--pins", action="store_true", help="name==version lines without hashes")
    args = parser.parse_args()
    skip = [s.strip().lower() for s in args.skip.split(",") if s.strip()]
    with open(args.lock) as fh:
        blocks = requirement_blocks(fh.read())
    if args.dev_lock:
        names = {n.strip().lower() for n in args.dev_names.split(",")}
        with open(args.dev_lock) as fh:
            blocks += [(name, block) for name, block in requirement_blocks(fh.read()) if name in names]
    kept = [block for name, block in blocks if not any(fnmatch.fnmatch(name, pattern) for pattern in skip)]
    if args.pins:
        kept = [block.splitlines()[0].removesuffix("\\").strip() for block in kept]
    sys.stdout.write("\n".join(kept) + "\n")
    print(f"{len(kept)} of {len(blocks)} packages (skipped: {args.skip})", file=sys.stderr)


if __name__ == "__main__":
    main()
