"""Scoring a run against MVTec-layout ground truth: metrics, the evaluation itself and its HTML report."""
