"""Evaluate an inspect run against MVTec-AD-layout ground truth: metrics.json and a self-contained report.html.

    python jobs/evaluate.py --output s3://plant-a/audit --data s3://plant-a/mvtec-root --out ./eval \
        [--run-id ID] [--compare-run OTHER_ID ...] [--model-store s3://plant-a/models]

--compare-run (repeatable) adds a side-by-side table of the runs on the test images all of them scored, the
evaluated run being the baseline: routing policies, or guidance on and off, over the same images.

Exit codes: 0 success, 2 bad arguments or nothing to evaluate (no rows, unknown run, no test images),
3 storage failure.
"""

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where jobs/inspect.py would shadow the standard
# library's `inspect` module for every later import: take the folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from eagle.cli.evaluate_cmd import main

if __name__ == "__main__":
    sys.exit(main())
