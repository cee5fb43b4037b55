"""qkv.interop: bring weights trained elsewhere onto qkv modules (nothing is downloaded).

- `load_hf_bert(path)`: a local Hugging Face BERT checkpoint as a qkv `Bert` encoder.
- `qkv.nn.MultiHeadAttention.from_torch` / `.to_torch`: torch's own attention module.
"""

from .hf_bert import Bert, BertConfig, load_hf_bert

__all__ = ["Bert", "BertConfig", "load_hf_bert"]
