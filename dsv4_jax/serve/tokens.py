"""DeepSeek-V4 chat special-token strings (spec §13); `｜` is U+FF5C and `▁` is U+2581.

Kept in one place so the encoder, the DSML tool-call codec and the server agree byte for byte.
"""

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"

# Quick Instruction task tokens, keyed by the message "task" field.
TASK_ACTION = "<｜action｜>"
TASK_QUERY = "<｜query｜>"
TASK_AUTHORITY = "<｜authority｜>"
TASK_DOMAIN = "<｜domain｜>"
TASK_TITLE = "<｜title｜>"
TASK_READ_URL = "<｜read_url｜>"
TASK_TOKENS = {
  "action": TASK_ACTION,
  "query": TASK_QUERY,
  "authority": TASK_AUTHORITY,
  "domain": TASK_DOMAIN,
  "title": TASK_TITLE,
  "read_url": TASK_READ_URL,
}
# Not a "task" value: the caller writes it into the user content before each URL of a read_url task,
# `...{prompt}<｜extracted_url｜>{url}<｜read_url｜>`.
EXTRACTED_URL = "<｜extracted_url｜>"

# Tokens that must never appear inside parsed content or reasoning.
CONTROL_TOKENS = (BOS, EOS, THINK_START, THINK_END, DSML)
