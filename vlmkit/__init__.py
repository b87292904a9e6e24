"""vlmkit: a from-scratch PyTorch engine for vision-language models."""
