"""Maintain an inspect output: compact small files, expire old Iceberg snapshots, remove orphan files.

Usage and options: `python jobs/maintain.py --help` (eagle/cli/maintain_cmd.py).
"""

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where jobs/inspect.py would shadow the standard
# library's `inspect` module for every later import: take the folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from eagle.cli.maintain_cmd import main

if __name__ == "__main__":
    sys.exit(main())
