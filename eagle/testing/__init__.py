"""What the offline demo and the tests build for themselves: synthetic MVTec-layout datasets with known defect
masks, tiny random MLLMs with locally trained tokenizers, and the no-argument demo."""
