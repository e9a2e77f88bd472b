"""Data: Alpaca / chat-template SFT records (`sft`), SuperGLUE formatting and metrics (`superglue`), and the
demo's generated tasks (`synthetic`). Imports no other part of badam_hf."""
