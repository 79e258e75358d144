"""eagle-audit: EAGLE (expert-augmented attention guidance) anomaly audits of product images on Ray."""

__version__ = "0.1.0"
