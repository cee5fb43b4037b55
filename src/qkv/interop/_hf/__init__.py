"""Internals of `qkv.interop.transformers` (nothing here imports transformers at import time)."""
