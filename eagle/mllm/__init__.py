"""The multimodal LLM: prompts from the expert's result, guided generation (CAAS through transformers'
AttentionInterface), answer parsing, and fetching checkpoints from object storage. Try a checkpoint on a few
images with ``python -m eagle.mllm --help``."""
