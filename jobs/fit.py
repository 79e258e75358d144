"""Fit per-product PatchCore experts (memory bank + label-free threshold) from normal training images.

    python jobs/fit.py --data s3://bucket/mvtec --model-store s3://bucket/models [--products a,b]
        [--backbone NAME] [--weights imagenet|random|PATH] [--threshold-method k-sigma|mad|quantile|evt]
        [--coreset-ratio R] [--config FILE] [section.key=value ...]

--data is an MVTec-AD-layout root ({product}/train/good/*.png). Products run as parallel Ray tasks sized by
resources.expert; each writes {model-store}/{product}/{version}/ and moves {product}/LATEST.
"""

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where jobs/inspect.py would shadow the standard
# library's `inspect` module for every later import: take the folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from eagle.cli.fit_cmd import main

if __name__ == "__main__":
    sys.exit(main())
