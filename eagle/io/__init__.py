"""Where data comes from and goes to: storage (local, file://, s3://), input listings and manifests, image
decoding, the output table's schema, run manifests and the history of earlier runs."""
