"""The jobs on Ray: connecting to Ray, the inspect pipeline (stages chained on Ray Data, routing) and the
per-product fit fan-out. `jobs/*.py` are thin command lines over this package."""

from eagle.pipeline.retry_tally import forward_storage_retries

forward_storage_retries()
