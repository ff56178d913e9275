"""The DeepSeek-V4 model, one concept per file."""
