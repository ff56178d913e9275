"""Serving: chat encoding and completion parsing for DeepSeek-V4."""
