"""Fit per-product experts (PatchCore, PaDiM, STFPM; each with a label-free threshold) from normal images.

Usage and options: `python jobs/fit.py --help` (eagle/cli/fit_cmd.py).
"""

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where jobs/inspect.py would shadow the standard
# library's `inspect` module for every later import: take the folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from eagle.cli.fit_cmd import main

if __name__ == "__main__":
    sys.exit(main())
