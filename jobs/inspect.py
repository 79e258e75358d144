"""Audit images: expert + (guided) MLLM over local or s3:// inputs, results as Hive-partitioned Parquet.

Usage and options: `python jobs/inspect.py --help` (eagle/cli/inspect_cmd.py).
"""

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where jobs/inspect.py would shadow the standard
# library's `inspect` module for every later import: take the folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from eagle.cli.inspect_cmd import main

if __name__ == "__main__":
    sys.exit(main())
