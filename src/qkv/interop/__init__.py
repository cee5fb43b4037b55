"""qkv.interop: bring weights trained elsewhere onto qkv modules (nothing is downloaded).

- `load_hf_bert(path)`: a local Hugging Face BERT checkpoint as a qkv `Bert` encoder.
- `qkv.nn.MultiHeadAttention.from_torch` / `.to_torch`: torch's own attention module.
- `qkv.interop.transformers.register()`: qkv as transformers' `attn_implementation="qkv"`
  (imported on first use; importing qkv.interop never imports transformers).
"""

from .hf_bert import Bert, BertConfig, load_hf_bert

__all__ = ["Bert", "BertConfig", "load_hf_bert"]


def __getattr__(name: str):
    if name == "transformers":  # qkv.interop.transformers without importing transformers itself
        import importlib

        return importlib.import_module(".transformers", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
