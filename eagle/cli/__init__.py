"""The command lines behind `jobs/*.py` (the entry points users know): arguments, exit codes, summaries."""
