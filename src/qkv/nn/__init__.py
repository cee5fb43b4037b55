"""qkv.nn: modules that own weights and call `qkv.attention` for all of their attention.

- `MultiHeadAttention`: batch-first (B, T, E) multi-head attention (GQA, cosine, RoPE, ALiBi).
- `TransformerEncoderLayer`, `TransformerDecoderLayer`: one layer each, equal to torch's.
- `TransformerEncoder`, `TransformerDecoder`, `Transformer`: stacks, the encoder-decoder.
- `DecoderLM`: a decoder-only language model.
- `KVCache`, `generate.greedy`, `generate.beam_search`: incremental decoding.
- Positions: `SinusoidalPositionalEncoding`, `LearnedPositionalEmbedding`,
  `RotaryEmbedding`, `ALiBi`.
- Classic attention of RNN translators: `AdditiveAttention`, `BilinearAttention`,
  `DotAttention`.
"""

from . import generate
from .attention import MultiHeadAttention
from .cache import AttentionCache, KVCache, LayerCache
from .classic import AdditiveAttention, AttentionContext, BilinearAttention, DotAttention
from .generate import BeamSearchResult, DecodingSession, beam_search, greedy
from .layers import (
    FeedForward,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from .models import (
    DecoderLM,
    DecoderLMConfig,
    Embeddings,
    Encoded,
    Transformer,
    TransformerConfig,
)
from .positional import (
    ALiBi,
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
)

__all__ = [
    "ALiBi",
    "AdditiveAttention",
    "AttentionCache",
    "AttentionContext",
    "BeamSearchResult",
    "BilinearAttention",
    "DecoderLM",
    "DecoderLMConfig",
    "DecodingSession",
    "DotAttention",
    "Embeddings",
    "Encoded",
    "FeedForward",
    "KVCache",
    "LayerCache",
    "LearnedPositionalEmbedding",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "Transformer",
    "TransformerConfig",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "beam_search",
    "generate",
    "greedy",
]
