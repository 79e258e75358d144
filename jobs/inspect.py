"""Audit images: expert + (guided) MLLM over local or s3:// inputs, results as Hive-partitioned Parquet.

    python jobs/inspect.py --input s3://bucket/images --model-store s3://bucket/models --output s3://bucket/audit
    ray job submit --working-dir . -- python jobs/inspect.py --config audit.yaml [section.key=value ...]
    python jobs/inspect.py            # no arguments: the embedded offline demo (synthetic data, tiny MLLM)

Exit codes: 0 success (individual bad images are error rows, not failures), 2 bad config or arguments,
3 job-level failure (storage unreachable, error rate above output.max_error_rate).
"""

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where jobs/inspect.py would shadow the standard
# library's `inspect` module for every later import: take the folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from eagle.cli.inspect_cmd import main

if __name__ == "__main__":
    sys.exit(main())
