"""The input-validation audit: every public entry point rejects bad input by name.

Each row of `CASES` calls one public function, constructor or method with one bad
argument and expects a `ValueError` or `TypeError` (a `FileNotFoundError` for missing
files) whose message names that argument. `test_every_public_callable_is_audited` walks
the `__all__` lists of qkv, qkv.masks, qkv.nn, qkv.numpy, qkv.interop and qkv.distributed:
a public name with no row here, and no entry in `NOT_AUDITED` saying why, fails the suite.

Rows marked `known=` are inputs the library does not validate today (it fails deep inside
torch, or returns a silently wrong result): they are strict xfails, listed in
docs/robustness.md, and turn into failures once the library is fixed, so that the mark is
removed with the fix.

The command line has its own audit, tests/test_cli_audit.py.
"""

from __future__ import annotations

import importlib
import json
import math
import types
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import qkv
import qkv.nn as qnn
import qkv.numpy as qnp
from qkv import masks
from qkv.interop import Bert, BertConfig, load_hf_bert

try:  # another engineer is building qkv.distributed: audited when it imports
    import torch.distributed as dist

    import qkv.distributed as qdist

    DISTRIBUTED_MISSING = None
except Exception as e:  # absent, or broken mid-edit
    qdist, DISTRIBUTED_MISSING = None, f"qkv.distributed does not import: {e!r}"


@dataclass(frozen=True)
class Bad:
    """One bad call: `call()` must raise `exc` with a message matching `match`."""

    entry: str  # dotted public path of the entry point (a method: Class.method)
    what: str  # the bad input, for the test id
    call: Callable[[], object]
    match: str  # a regex that names the argument
    exc: type[Exception] | tuple[type[Exception], ...] = (ValueError, TypeError)
    known: str | None = None  # why the library fails this today (strict xfail)


def t(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype)


def long(*shape) -> torch.Tensor:
    return torch.ones(*shape, dtype=torch.long)


Q, K, V = t(2, 4, 5, 8), t(2, 2, 6, 8), t(2, 2, 6, 3)  # (B, Hq, Tq, D), (B, Hkv, Tk, D/Dv)


def attn(**kw):
    call = {"q": Q, "k": K, "v": V, **kw}
    return qkv.attention(call.pop("q"), call.pop("k"), call.pop("v"), **call)


def mha(**kw) -> qkv.MultiHeadAttention:
    return qkv.MultiHeadAttention(8, 2, **kw)


X = t(2, 3, 8)  # (B, T, E) for the modules of width 8

# ---- qkv ------------------------------------------------------------------------------

ATTENTION = [
    Bad("qkv.attention", "q ndarray", lambda: attn(q=np.zeros((2, 4, 5, 8))), r"\bq must be a torch.Tensor"),
    Bad("qkv.attention", "k list", lambda: attn(k=[[1.0]]), r"\bk must be a torch.Tensor"),
    Bad("qkv.attention", "q int", lambda: attn(q=t(2, 4, 5, 8, dtype=torch.int64)), r"\bq must be a floating-point"),
    Bad("qkv.attention", "k bool", lambda: attn(k=t(2, 2, 6, 8, dtype=torch.bool)), r"\bk must be a floating-point"),
    Bad("qkv.attention", "v 3-D", lambda: attn(v=t(2, 6, 3)), r"\bv must have 4 dimensions"),
    Bad("qkv.attention", "q 5-D", lambda: attn(q=t(1, 2, 4, 5, 8)), r"\bq must have 4 dimensions"),
    Bad("qkv.attention", "dtypes differ", lambda: attn(k=K.double()), r"q, k and v must share one dtype"),
    Bad("qkv.attention", "batch", lambda: attn(q=t(3, 4, 5, 8)), r"same batch size B; got q \(3"),
    Bad("qkv.attention", "Tk of k and v", lambda: attn(k=t(2, 2, 7, 8)), r"\bk and v must have the same heads Hkv and length Tk"),
    Bad("qkv.attention", "heads of k and v", lambda: attn(v=t(2, 1, 6, 3)), r"\bk and v must have the same heads"),
    Bad("qkv.attention", "head dim", lambda: attn(k=t(2, 2, 6, 7)), r"\bq and k must have the same head dim D"),
    Bad("qkv.attention", "Hq % Hkv", lambda: attn(k=t(2, 3, 6, 8), v=t(2, 3, 6, 3)), r"multiple of the key/value heads Hkv; got q .* and k"),
    Bad("qkv.attention", "dropout_p < 0", lambda: attn(dropout_p=-0.1), r"dropout_p must lie in \[0, 1\]"),
    Bad("qkv.attention", "dropout_p > 1", lambda: attn(dropout_p=1.5), r"dropout_p must lie in \[0, 1\]"),
    Bad("qkv.attention", "dropout_p nan", lambda: attn(dropout_p=math.nan), r"dropout_p must lie"),
    Bad("qkv.attention", "dropout_p str", lambda: attn(dropout_p="0.1"), r"dropout_p must be a real number"),
    Bad("qkv.attention", "dropout_p bool", lambda: attn(dropout_p=True), r"dropout_p must be a real number"),
    Bad("qkv.attention", "scale nan", lambda: attn(scale=math.nan), r"scale must be finite"),
    Bad("qkv.attention", "scale -inf", lambda: attn(scale=-math.inf), r"scale must be finite"),
    Bad("qkv.attention", "scale str", lambda: attn(scale="big"), r"scale must be a real number"),
    Bad("qkv.attention", "scale 2-element tensor", lambda: attn(scale=torch.ones(2)), r"scale must be a real number"),
    Bad("qkv.attention", "causal int", lambda: attn(causal=1), r"causal must be a bool"),
    Bad("qkv.attention", "return_weights str", lambda: attn(return_weights="yes"), r"return_weights must be a bool"),
    Bad("qkv.attention", "return_lse None", lambda: attn(return_lse=None), r"return_lse must be a bool"),
    Bad("qkv.attention", "generator int", lambda: attn(generator=0), r"generator must be a torch.Generator"),
    Bad("qkv.attention", "mask float", lambda: attn(mask=torch.ones(5, 6)), r"mask must be a bool tensor.*bias="),
    Bad("qkv.attention", "mask list", lambda: attn(mask=[[True]]), r"mask must be None, a bool tensor or a qkv.masks mask"),
    Bad("qkv.attention", "mask shape", lambda: attn(mask=torch.ones(5, 7, dtype=torch.bool)), r"mask of shape \(1, 1, 5, 7\) does not broadcast"),
    Bad("qkv.attention", "mask 5-D", lambda: attn(mask=torch.ones(1, 2, 4, 5, 6, dtype=torch.bool)), r"\bmask\b"),
    Bad("qkv.attention", "mask padding B", lambda: attn(mask=masks.padding([1, 2, 3])), r"mask: padding has 3 lengths but the batch has B=2"),
    Bad("qkv.attention", "mask padding > Tk", lambda: attn(mask=masks.padding([1, 7])), r"mask: padding lengths must lie in \[0, Tk=6\]"),
    Bad("qkv.attention", "mask document shape", lambda: attn(mask=masks.document(long(2, 4))), r"mask: document ids must be \(B, Tq\)"),
    Bad("qkv.attention", "bias bool", lambda: attn(bias=torch.ones(5, 6, dtype=torch.bool)), r"bias must be a floating-point tensor"),
    Bad("qkv.attention", "bias float", lambda: attn(bias=1.0), r"bias must be a floating-point tensor; got float"),
    Bad("qkv.attention", "bias shape", lambda: attn(bias=t(5, 7)), r"bias of shape \(5, 7\) does not broadcast"),
    Bad("qkv.attention", "bias 5-D", lambda: attn(bias=t(1, 1, 1, 5, 6)), r"bias of shape"),
    Bad("qkv.attention", "kernel name", lambda: attn(kernel="fast"), r"kernel must be 'auto' or one of"),
    Bad("qkv.attention", "kernel list", lambda: attn(kernel=["fused"]), r"\bkernel\b"),
    Bad("qkv.attention", "fused + weights", lambda: attn(kernel="fused", return_weights=True), r"kernel='fused' cannot run this call: .*weights"),
    Bad("qkv.attention", "fused + bias", lambda: attn(kernel="fused", bias=t(5, 6)), r"kernel='fused' cannot run this call: .*bias"),
    Bad("qkv.attention", "tiled + weights + grad", lambda: attn(q=Q.clone().requires_grad_(), kernel="tiled", return_weights=True), r"kernel='tiled' cannot run this call"),
]  # fmt: skip

ATTENTION_WEIGHTS = [
    Bad("qkv.attention_weights", "q ndarray", lambda: qkv.attention_weights(np.zeros((2, 4, 5, 8)), K), r"\bq must be a torch.Tensor"),
    Bad("qkv.attention_weights", "k 3-D", lambda: qkv.attention_weights(Q, t(2, 6, 8)), r"\bk must have 4 dimensions"),
    Bad("qkv.attention_weights", "heads bool", lambda: qkv.attention_weights(Q, K, heads=[True]), r"heads must be an int, a slice"),
    Bad("qkv.attention_weights", "heads range", lambda: qkv.attention_weights(Q, K, heads=[4]), r"heads must index into 4"),
    Bad("qkv.attention_weights", "rows float", lambda: qkv.attention_weights(Q, K, rows=[1.5]), r"rows must be an int, a slice"),
    Bad("qkv.attention_weights", "rows 2-D", lambda: qkv.attention_weights(Q, K, rows=[[0]]), r"rows must be"),
    Bad("qkv.attention_weights", "rows range", lambda: qkv.attention_weights(Q, K, rows=-6), r"rows must index into 5"),
    Bad("qkv.attention_weights", "rows str", lambda: qkv.attention_weights(Q, K, rows="0"), r"\brows\b"),
    Bad("qkv.attention_weights", "causal str", lambda: qkv.attention_weights(Q, K, causal="yes"), r"causal must be a bool"),
    Bad("qkv.attention_weights", "scale inf", lambda: qkv.attention_weights(Q, K, scale=math.inf), r"scale must be finite"),
    Bad("qkv.check", "obj int", lambda: qkv.check(42), r"\bobj must be"),
    Bad("qkv.check", "init for a function", lambda: qkv.check(lambda q, k, v: q, d_model=8), r"init values \['d_model'\].*not a class"),
]  # fmt: skip

EXPLAIN = [
    Bad("qkv.explain", "unknown option", lambda: qkv.explain(Q, K, V, masks=None), r"explain got unexpected options \['masks'\]"),
    Bad("qkv.explain", "dropout_p", lambda: qkv.explain(Q, K, V, dropout_p=2.0), r"dropout_p must lie in"),
    Bad("qkv.explain", "kernel", lambda: qkv.explain(Q, K, V, kernel="nope"), r"kernel must be 'auto' or one of"),
    Bad("qkv.explain", "v rank", lambda: qkv.explain(Q, K, t(6, 3)), r"\bv must have 4 dimensions"),
]  # fmt: skip

# ---- qkv.MultiHeadAttention -----------------------------------------------------------

MHA = [
    Bad("qkv.nn.MultiHeadAttention", "embed_dim 0", lambda: qkv.MultiHeadAttention(0, 1), r"embed_dim must be >= 1"),
    Bad("qkv.nn.MultiHeadAttention", "embed_dim float", lambda: qkv.MultiHeadAttention(8.0, 2), r"embed_dim must be an int"),
    Bad("qkv.nn.MultiHeadAttention", "embed_dim bool", lambda: qkv.MultiHeadAttention(True, 1), r"embed_dim must be an int"),
    Bad("qkv.nn.MultiHeadAttention", "num_heads 0", lambda: qkv.MultiHeadAttention(8, 0), r"num_heads must be >= 1"),
    Bad("qkv.nn.MultiHeadAttention", "embed_dim % num_heads", lambda: qkv.MultiHeadAttention(8, 3), r"embed_dim \(8\) must be divisible by num_heads \(3\)"),
    Bad("qkv.nn.MultiHeadAttention", "num_kv_heads divides", lambda: qkv.MultiHeadAttention(8, 4, num_kv_heads=3), r"num_kv_heads \(3\) must divide num_heads \(4\)"),
    Bad("qkv.nn.MultiHeadAttention", "num_kv_heads 0", lambda: mha(num_kv_heads=0), r"num_kv_heads must be >= 1"),
    Bad("qkv.nn.MultiHeadAttention", "kdim 0", lambda: mha(kdim=0), r"kdim must be >= 1"),
    Bad("qkv.nn.MultiHeadAttention", "vdim str", lambda: mha(vdim="8"), r"vdim must be an int"),
    Bad("qkv.nn.MultiHeadAttention", "dropout 1", lambda: mha(dropout=1.0), r"dropout must lie in \[0, 1\)"),
    Bad("qkv.nn.MultiHeadAttention", "dropout < 0", lambda: mha(dropout=-0.1), r"dropout must lie in"),
    Bad("qkv.nn.MultiHeadAttention", "dropout str", lambda: mha(dropout="0.1"), r"dropout must be a float"),
    Bad("qkv.nn.MultiHeadAttention", "score", lambda: mha(score="euclid"), r"score must be one of"),
    Bad("qkv.nn.MultiHeadAttention", "cosine_scale 0", lambda: mha(score="cosine", cosine_scale=0), r"cosine_scale must lie in"),
    Bad("qkv.nn.MultiHeadAttention", "rotary head_dim", lambda: mha(rotary=qnn.RotaryEmbedding(6)), r"rotary was built for head_dim=6"),
    Bad("qkv.nn.MultiHeadAttention", "alibi heads", lambda: mha(alibi=qnn.ALiBi(4)), r"alibi has 4 heads but num_heads is 2"),
    Bad("qkv.nn.MultiHeadAttention", "rotary str", lambda: mha(rotary="rope"), r"\brotary\b"),
]  # fmt: skip

MHA_FORWARD = [
    Bad("qkv.nn.MultiHeadAttention.forward", "query ndarray", lambda: mha()(np.zeros((2, 3, 8))), r"query must be a torch.Tensor"),
    Bad("qkv.nn.MultiHeadAttention.forward", "query 2-D", lambda: mha()(t(3, 8)), r"query must be batched .*query.unsqueeze\(0\)"),
    Bad("qkv.nn.MultiHeadAttention.forward", "query 4-D", lambda: mha()(t(1, 2, 3, 8)), r"query must have shape \(B, T, E\)"),
    Bad("qkv.nn.MultiHeadAttention.forward", "query width", lambda: mha()(t(2, 3, 5)), r"query has 5 features but the module expects E=8"),
    Bad("qkv.nn.MultiHeadAttention.forward", "query int", lambda: mha()(t(2, 3, 8, dtype=torch.int64)), r"query is torch.int64 but the parameters"),
    Bad("qkv.nn.MultiHeadAttention.forward", "key width", lambda: mha(kdim=4)(X, t(2, 3, 5), t(2, 3, 8)), r"key has 5 features but the module expects Ek=4"),
    Bad("qkv.nn.MultiHeadAttention.forward", "value without key", lambda: mha()(X, None, X), r"value was given without key"),
    Bad("qkv.nn.MultiHeadAttention.forward", "key batch", lambda: mha()(X, t(3, 3, 8), t(3, 3, 8)), r"query .*, key .* and value .* must agree on B and Tk"),
    Bad("qkv.nn.MultiHeadAttention.forward", "value length", lambda: mha()(X, t(2, 4, 8), t(2, 5, 8)), r"must agree on B and Tk"),
    Bad("qkv.nn.MultiHeadAttention.forward", "key=None needs kdim", lambda: mha(kdim=4)(X), r"self-attention \(key=None\) needs kdim = vdim = embed_dim"),
    Bad("qkv.nn.MultiHeadAttention.forward", "mask float", lambda: mha()(X, mask=torch.ones(2, 3)), r"mask must be a bool tensor .*~key_padding_mask"),
    Bad("qkv.nn.MultiHeadAttention.forward", "mask (Tq, Tk)", lambda: mha()(t(1, 3, 8), mask=torch.ones(3, 3, dtype=torch.bool)), r"a 2-D mask is a key padding mask .*mask\[None, None\]"),
    Bad("qkv.nn.MultiHeadAttention.forward", "mask 3-D", lambda: mha()(X, mask=torch.ones(2, 4, 3, dtype=torch.bool)), r"a 3-D mask must broadcast to \(B, Tq, Tk\)"),
    Bad("qkv.nn.MultiHeadAttention.forward", "mask 5-D", lambda: mha()(X, mask=torch.ones(1, 1, 1, 3, 3, dtype=torch.bool)), r"mask must be \(B, Tk\), \(B, Tq, Tk\) or \(B, H, Tq, Tk\)"),
    Bad("qkv.nn.MultiHeadAttention.forward", "mask list", lambda: mha()(X, mask=[True]), r"mask must be None, a bool tensor"),
    Bad("qkv.nn.MultiHeadAttention.forward", "causal str", lambda: mha()(X, causal="yes"), r"causal must be a bool"),
    Bad("qkv.nn.MultiHeadAttention.forward", "need_weights str", lambda: mha()(X, need_weights="yes"), r"need_weights"),
    Bad("qkv.nn.MultiHeadAttention.forward", "cache str", lambda: mha()(X, cache="cache"), r"cache must be an AttentionCache"),
    Bad("qkv.nn.MultiHeadAttention.forward", "cache of another module", lambda: mha()(X, cache=mha().new_cache()), r"cache was made by another attention module"),
]  # fmt: skip

MHA_METHODS = [
    Bad("qkv.nn.MultiHeadAttention.from_torch", "not a module", lambda: qkv.MultiHeadAttention.from_torch("m"), r"from_torch expects torch.nn.MultiheadAttention"),
    Bad("qkv.nn.MultiHeadAttention.from_torch", "add_bias_kv", lambda: qkv.MultiHeadAttention.from_torch(torch.nn.MultiheadAttention(8, 2, add_bias_kv=True)), r"add_bias_kv=True is not supported"),
    Bad("qkv.nn.MultiHeadAttention.to_torch", "grouped-query", lambda: qkv.MultiHeadAttention(8, 4, num_kv_heads=2).to_torch(), r"to_torch: .*num_kv_heads"),
    Bad("qkv.nn.MultiHeadAttention.new_cache", "capacity 0", lambda: mha().new_cache(capacity=0), r"capacity must be >= 1"),
    Bad("qkv.nn.MultiHeadAttention.new_cache", "capacity float", lambda: mha().new_cache(capacity=1.5), r"capacity must be an int"),
]  # fmt: skip

# ---- qkv.nn ---------------------------------------------------------------------------


def _decoder_layer():
    return qnn.TransformerDecoderLayer(8, 2, ffn_dim=16, dropout=0.0)


def _config(**kw) -> qnn.TransformerConfig:
    base = dict(src_vocab_size=11, tgt_vocab_size=12, embed_dim=8, num_heads=2,
                num_encoder_layers=1, num_decoder_layers=1, ffn_dim=16, dropout=0.0)  # fmt: skip
    return qnn.TransformerConfig(**{**base, **kw})


def _lm_config(**kw) -> qnn.DecoderLMConfig:
    base = dict(vocab_size=11, embed_dim=8, num_heads=2, num_layers=1, ffn_dim=16, dropout=0.0)
    return qnn.DecoderLMConfig(**{**base, **kw})


def _transformer() -> qnn.Transformer:
    return qnn.Transformer(_config()).eval()


CLASSIC = [
    Bad("qkv.nn.AdditiveAttention", "query_dim 0", lambda: qnn.AdditiveAttention(0, 4, 4), r"query_dim must be positive"),
    Bad("qkv.nn.AdditiveAttention", "key_dim str", lambda: qnn.AdditiveAttention(4, "4", 4), r"key_dim must be an int"),
    Bad("qkv.nn.AdditiveAttention", "hidden_dim < 0", lambda: qnn.AdditiveAttention(4, 4, -1), r"hidden_dim must be positive"),
    Bad("qkv.nn.AdditiveAttention.forward", "query int", lambda: qnn.AdditiveAttention(4, 4, 4)(long(2, 3, 4), t(2, 5, 4)), r"query must be a floating-point tensor"),
    Bad("qkv.nn.AdditiveAttention.forward", "keys 2-D", lambda: qnn.AdditiveAttention(4, 4, 4)(t(2, 3, 4), t(5, 4)), r"keys must have shape \(B, Tk, Dk\)"),
    Bad("qkv.nn.AdditiveAttention.forward", "query 2-D", lambda: qnn.AdditiveAttention(4, 4, 4)(t(2, 4), t(2, 5, 4)), r"query must have shape .*query.unsqueeze\(1\)"),
    Bad("qkv.nn.AdditiveAttention.forward", "query_dim", lambda: qnn.AdditiveAttention(4, 4, 4)(t(2, 3, 5), t(2, 5, 4)), r"query must have Dq=query_dim=4"),
    Bad("qkv.nn.AdditiveAttention.forward", "key_dim", lambda: qnn.AdditiveAttention(4, 4, 4)(t(2, 3, 4), t(2, 5, 3)), r"keys must have Dk=key_dim=4"),
    Bad("qkv.nn.AdditiveAttention.forward", "batch", lambda: qnn.AdditiveAttention(4, 4, 4)(t(2, 3, 4), t(3, 5, 4)), r"query, keys and values must share the batch size B"),
    Bad("qkv.nn.AdditiveAttention.forward", "values length", lambda: qnn.AdditiveAttention(4, 4, 4)(t(2, 3, 4), t(2, 5, 4), t(2, 6, 2)), r"keys and values must have the same length Tk"),
    Bad("qkv.nn.AdditiveAttention.forward", "dtypes", lambda: qnn.AdditiveAttention(4, 4, 4)(t(2, 3, 4), t(2, 5, 4).double()), r"query, keys and values must share one dtype"),
    Bad("qkv.nn.AdditiveAttention.forward", "mask float", lambda: qnn.AdditiveAttention(4, 4, 4)(t(2, 3, 4), t(2, 5, 4), mask=torch.ones(2, 1, 5)), r"mask must be None, a bool tensor"),
    Bad("qkv.nn.AdditiveAttention.forward", "mask shape", lambda: qnn.AdditiveAttention(4, 4, 4)(t(2, 3, 4), t(2, 5, 4), mask=torch.ones(2, 1, 4, dtype=torch.bool)), r"mask of shape \(2, 1, 4\) does not broadcast"),
    Bad("qkv.nn.BilinearAttention", "query_dim 0", lambda: qnn.BilinearAttention(0, 4), r"query_dim must be positive"),
    Bad("qkv.nn.BilinearAttention", "key_dim float", lambda: qnn.BilinearAttention(4, 4.0), r"key_dim must be an int"),
    Bad("qkv.nn.BilinearAttention.forward", "key_dim", lambda: qnn.BilinearAttention(4, 4)(t(2, 3, 4), t(2, 5, 3)), r"keys must have Dk=key_dim=4"),
    Bad("qkv.nn.DotAttention", "scaled int", lambda: qnn.DotAttention(scaled=1), r"scaled must be a bool"),
    Bad("qkv.nn.DotAttention.forward", "sizes differ", lambda: qnn.DotAttention()(t(2, 3, 4), t(2, 5, 3)), r"DotAttention needs query and keys of the same size D"),
    Bad("qkv.nn.DotAttention.forward", "values 4-D", lambda: qnn.DotAttention()(t(2, 3, 4), t(2, 5, 4), t(2, 1, 5, 4)), r"values must have shape \(B, Tk, Dv\)"),
]  # fmt: skip

POSITIONAL = [
    Bad("qkv.nn.ALiBi", "num_heads 0", lambda: qnn.ALiBi(0), r"num_heads must be positive"),
    Bad("qkv.nn.ALiBi", "num_heads float", lambda: qnn.ALiBi(2.5), r"num_heads must be an int"),
    Bad("qkv.nn.ALiBi.forward", "Tq < 0", lambda: qnn.ALiBi(2)(-1, 3), r"Tq must be a non-negative int"),
    Bad("qkv.nn.ALiBi.forward", "Tk float", lambda: qnn.ALiBi(2)(3, 1.5), r"Tk must be a non-negative int"),
    Bad("qkv.nn.ALiBi.forward", "dtype int", lambda: qnn.ALiBi(2)(3, 3, dtype=torch.int64), r"dtype must be a floating-point dtype"),
    Bad("qkv.nn.RotaryEmbedding", "head_dim odd", lambda: qnn.RotaryEmbedding(3), r"head_dim must be even"),
    Bad("qkv.nn.RotaryEmbedding", "head_dim 0", lambda: qnn.RotaryEmbedding(0), r"head_dim must be positive"),
    Bad("qkv.nn.RotaryEmbedding", "base 1", lambda: qnn.RotaryEmbedding(4, base=1.0), r"base must be a finite number > 1"),
    Bad("qkv.nn.RotaryEmbedding", "max_positions 0", lambda: qnn.RotaryEmbedding(4, max_positions=0), r"max_positions must be positive"),
    Bad("qkv.nn.RotaryEmbedding.forward", "x int", lambda: qnn.RotaryEmbedding(4)(long(1, 2, 3, 4)), r"x must be a floating-point tensor"),
    Bad("qkv.nn.RotaryEmbedding.forward", "x 3-D", lambda: qnn.RotaryEmbedding(4)(t(2, 3, 4)), r"x must have shape \(B, H, T, D\)"),
    Bad("qkv.nn.RotaryEmbedding.forward", "x head_dim", lambda: qnn.RotaryEmbedding(4)(t(1, 2, 3, 6)), r"last dim equal to head_dim=4"),
    Bad("qkv.nn.RotaryEmbedding.forward", "offset < 0", lambda: qnn.RotaryEmbedding(4)(t(1, 2, 3, 4), offset=-1), r"offset must be >= 0"),
    Bad("qkv.nn.RotaryEmbedding.forward", "offset float", lambda: qnn.RotaryEmbedding(4)(t(1, 2, 3, 4), offset=1.5), r"offset must be an int"),
    Bad("qkv.nn.RotaryEmbedding.forward", "offset float tensor", lambda: qnn.RotaryEmbedding(4)(t(1, 2, 3, 4), offset=torch.tensor([1.0])), r"offset must be an int or an integer tensor"),
    Bad("qkv.nn.RotaryEmbedding.forward", "offset tensor shape", lambda: qnn.RotaryEmbedding(4)(t(2, 2, 3, 4), offset=long(3)), r"offset as a tensor must have shape \(B,\)"),
    Bad("qkv.nn.SinusoidalPositionalEncoding", "embed_dim 0", lambda: qnn.SinusoidalPositionalEncoding(0), r"embed_dim must be positive"),
    Bad("qkv.nn.SinusoidalPositionalEncoding", "max_len 0", lambda: qnn.SinusoidalPositionalEncoding(8, max_len=0), r"max_len must be positive"),
    Bad("qkv.nn.SinusoidalPositionalEncoding", "dropout 1", lambda: qnn.SinusoidalPositionalEncoding(8, dropout=1.0), r"dropout must lie in \[0, 1\)"),
    Bad("qkv.nn.SinusoidalPositionalEncoding", "base nan", lambda: qnn.SinusoidalPositionalEncoding(8, base=math.nan), r"base must be a finite number > 1"),
    Bad("qkv.nn.SinusoidalPositionalEncoding.forward", "x width", lambda: qnn.SinusoidalPositionalEncoding(8)(t(2, 3, 5)), r"x must have shape \(B, T, E\) with the last dim equal to embed_dim=8"),
    Bad("qkv.nn.SinusoidalPositionalEncoding.forward", "offset < 0", lambda: qnn.SinusoidalPositionalEncoding(8)(X, offset=-2), r"offset must be >= 0"),
    Bad("qkv.nn.LearnedPositionalEmbedding", "max_len 0", lambda: qnn.LearnedPositionalEmbedding(0, 8), r"max_len must be positive"),
    Bad("qkv.nn.LearnedPositionalEmbedding", "dropout < 0", lambda: qnn.LearnedPositionalEmbedding(4, 8, dropout=-0.5), r"dropout must lie in"),
    Bad("qkv.nn.LearnedPositionalEmbedding.forward", "past max_len", lambda: qnn.LearnedPositionalEmbedding(4, 8)(X, offset=2), r"beyond max_len=4 .*offset=2"),
    Bad("qkv.nn.LearnedPositionalEmbedding.forward", "x bool", lambda: qnn.LearnedPositionalEmbedding(4, 8)(X.bool()), r"x must be a floating-point tensor"),
]  # fmt: skip

LAYERS = [
    Bad("qkv.nn.FeedForward", "activation", lambda: qnn.FeedForward(8, 16, activation="tanh"), r"activation must be one of"),
    Bad("qkv.nn.FeedForward", "dropout 2", lambda: qnn.FeedForward(8, 16, dropout=2.0), r"dropout"),
    Bad("qkv.nn.FeedForward", "embed_dim < 0", lambda: qnn.FeedForward(-1, 16), r"embed_dim"),
    Bad("qkv.nn.TransformerEncoderLayer", "num_heads", lambda: qnn.TransformerEncoderLayer(8, 3), r"divisible by num_heads \(3\)"),
    Bad("qkv.nn.TransformerEncoderLayer", "dropout 1", lambda: qnn.TransformerEncoderLayer(8, 2, dropout=1.0), r"dropout must lie in \[0, 1\)"),
    Bad("qkv.nn.TransformerEncoderLayer", "dropout str", lambda: qnn.TransformerEncoderLayer(8, 2, dropout="0"), r"dropout must be a float"),
    Bad("qkv.nn.TransformerEncoderLayer", "activation", lambda: qnn.TransformerEncoderLayer(8, 2, activation="swish"), r"activation must be one of"),
    Bad("qkv.nn.TransformerEncoderLayer", "num_kv_heads", lambda: qnn.TransformerEncoderLayer(8, 2, num_kv_heads=3), r"num_kv_heads \(3\) must divide"),
    Bad("qkv.nn.TransformerEncoderLayer", "ffn_dim < 0", lambda: qnn.TransformerEncoderLayer(8, 2, ffn_dim=-1), r"ffn_dim"),
    Bad("qkv.nn.TransformerEncoderLayer", "attn_dropout 1.5", lambda: qnn.TransformerEncoderLayer(8, 2, attn_dropout=1.5), r"attn_dropout"),
    Bad("qkv.nn.TransformerEncoderLayer.forward", "x width", lambda: qnn.TransformerEncoderLayer(8, 2, ffn_dim=4)(t(1, 3, 5)), r"\bx\b"),
    Bad("qkv.nn.TransformerDecoderLayer", "dropout -1", lambda: qnn.TransformerDecoderLayer(8, 2, dropout=-1.0), r"dropout must lie in"),
    Bad("qkv.nn.TransformerDecoderLayer", "activation", lambda: qnn.TransformerDecoderLayer(8, 2, activation="swish"), r"activation must be one of"),
    Bad("qkv.nn.TransformerDecoderLayer.forward", "memory None", lambda: _decoder_layer()(X, None), r"\bmemory\b"),
    Bad("qkv.nn.TransformerDecoderLayer.forward", "memory width", lambda: _decoder_layer()(X, t(2, 4, 5)), r"\bmemory\b"),
    Bad("qkv.nn.TransformerDecoderLayer.forward", "memory batch", lambda: _decoder_layer()(X, t(3, 4, 8)), r"\bx\b.*\bmemory\b.*same batch size"),
    Bad("qkv.nn.TransformerEncoder", "num_layers 0", lambda: qnn.TransformerEncoder(qnn.TransformerEncoderLayer(8, 2), 0), r"num_layers must be a positive int"),
    Bad("qkv.nn.TransformerEncoder", "layer str", lambda: qnn.TransformerEncoder("layer", 2), r"\blayer\b"),
    Bad("qkv.nn.TransformerEncoder.forward", "cache of another model", lambda: qnn.TransformerEncoder(qnn.TransformerEncoderLayer(8, 2), 1)(X, causal=True, cache=qnn.TransformerEncoder(qnn.TransformerEncoderLayer(8, 2), 1).new_cache()), r"this KVCache was made by another model"),
    Bad("qkv.nn.TransformerDecoder", "num_layers float", lambda: qnn.TransformerDecoder(_decoder_layer(), 1.5), r"num_layers must be a positive int"),
    Bad("qkv.nn.TransformerDecoder", "encoder layer", lambda: qnn.TransformerDecoder(qnn.TransformerEncoderLayer(8, 2), 1), r"layer must be a TransformerDecoderLayer"),
    Bad("qkv.nn.TransformerDecoder.forward", "memory None", lambda: qnn.TransformerDecoder(_decoder_layer(), 1)(X, None), r"\bmemory\b"),
    Bad("qkv.nn.TransformerDecoder.forward", "memory None, empty cache", lambda: (d := qnn.TransformerDecoder(_decoder_layer(), 1))(X, None, cache=d.new_cache()), r"\bmemory\b"),
]  # fmt: skip

MODELS = [
    Bad("qkv.nn.TransformerConfig", "src_vocab_size 0", lambda: _config(src_vocab_size=0), r"TransformerConfig.src_vocab_size must be an int >= 1"),
    Bad("qkv.nn.TransformerConfig", "embed_dim % num_heads", lambda: _config(num_heads=3), r"embed_dim \(8\) must be divisible by num_heads \(3\)"),
    Bad("qkv.nn.TransformerConfig", "num_kv_heads", lambda: _config(num_kv_heads=3), r"num_kv_heads \(3\) must divide"),
    Bad("qkv.nn.TransformerConfig", "dropout 1", lambda: _config(dropout=1.0), r"dropout must lie in \[0, 1\)"),
    Bad("qkv.nn.TransformerConfig", "positional", lambda: _config(positional="relative"), r"positional must be one of"),
    Bad("qkv.nn.TransformerConfig", "pad_id", lambda: _config(pad_id=11), r"pad_id must be a token id in \[0, 11\)"),
    Bad("qkv.nn.TransformerConfig", "rope odd head dim", lambda: _config(embed_dim=6, num_heads=2, positional="rope"), r"positional='rope' needs an even head dim"),
    Bad("qkv.nn.TransformerConfig", "bos_id None", lambda: _config(bos_id=None), r"bos_id"),
    Bad("qkv.nn.DecoderLMConfig", "vocab_size 0", lambda: _lm_config(vocab_size=0), r"DecoderLMConfig.vocab_size must be an int >= 1"),
    Bad("qkv.nn.DecoderLMConfig", "num_layers bool", lambda: _lm_config(num_layers=True), r"num_layers must be an int >= 1"),
    Bad("qkv.nn.DecoderLMConfig", "eos_id", lambda: _lm_config(eos_id=-1), r"eos_id must be a token id"),
    Bad("qkv.nn.Transformer", "config dict", lambda: qnn.Transformer({"src_vocab_size": 3}), r"config must be a TransformerConfig"),
    Bad("qkv.nn.Transformer", "activation", lambda: qnn.Transformer(_config(activation="swish")), r"activation must be one of"),
    Bad("qkv.nn.Transformer.forward", "tgt float", lambda: _transformer()(long(2, 5), t(2, 3)), r"\btgt\b"),
    Bad("qkv.nn.Transformer.forward", "src/tgt batch", lambda: _transformer()(long(2, 5), long(3, 3)), r"\bsrc\b.*\btgt\b|\btgt\b.*\bsrc\b"),
    Bad("qkv.nn.Transformer.forward", "src out of vocabulary", lambda: _transformer()(long(2, 5) * 11, long(2, 3)), r"token ids must lie in \[0, 11\)"),
    Bad("qkv.nn.DecoderLM", "config type", lambda: qnn.DecoderLM(_config()), r"config must be a DecoderLMConfig"),
    Bad("qkv.nn.DecoderLM.forward", "tokens float", lambda: qnn.DecoderLM(_lm_config())(t(2, 3)), r"tokens must be an integer tensor"),
    Bad("qkv.nn.DecoderLM.forward", "tokens 3-D", lambda: qnn.DecoderLM(_lm_config())(long(1, 2, 3)), r"tokens must have shape \(B, T\)"),
    Bad("qkv.nn.DecoderLM.forward", "mask shape", lambda: qnn.DecoderLM(_lm_config())(long(2, 3), mask=torch.ones(2, 4, dtype=torch.bool)), r"2-D mask is a key padding mask"),
    Bad("qkv.nn.DecoderLM.start_decoding", "prompt 1-D", lambda: qnn.DecoderLM(_lm_config()).start_decoding(long(3)), r"prompt must be a \(B, P\) token tensor"),
    Bad("qkv.nn.Embeddings", "pad_id >= vocab_size", lambda: qnn.Embeddings(4, 8, pad_id=4, scale=False, positional=None, dropout=0.0), r"pad_id"),
    Bad("qkv.nn.Embeddings.forward", "tokens out of range", lambda: qnn.Embeddings(4, 8, pad_id=0, scale=False, positional=None, dropout=0.0)(long(1, 2) * 4), r"token ids must lie in \[0, 4\)"),
]  # fmt: skip

DECODING = [
    Bad("qkv.nn.greedy", "inputs float", lambda: qnn.greedy(_transformer(), t(1, 3), max_new_tokens=2), r"inputs must be a \(B, S\) or \(B, P\) tensor of token ids"),
    Bad("qkv.nn.greedy", "max_new_tokens < 0", lambda: qnn.greedy(_transformer(), long(1, 3), max_new_tokens=-1), r"max_new_tokens must be an int >= 0"),
    Bad("qkv.nn.greedy", "model str", lambda: qnn.greedy("model", long(1, 3), max_new_tokens=2), r"\bmodel\b"),
    Bad("qkv.nn.greedy", "eos_id str", lambda: qnn.greedy(_transformer(), long(1, 3), max_new_tokens=2, eos_id="end"), r"eos_id"),
    Bad("qkv.nn.beam_search", "num_beams 0", lambda: qnn.beam_search(_transformer(), long(1, 3), max_new_tokens=2, num_beams=0), r"num_beams must be an int >= 1"),
    Bad("qkv.nn.beam_search", "max_new_tokens float", lambda: qnn.beam_search(_transformer(), long(1, 3), max_new_tokens=2.0), r"max_new_tokens must be an int"),
    Bad("qkv.nn.beam_search", "length_penalty str", lambda: qnn.beam_search(_transformer(), long(1, 3), max_new_tokens=2, num_beams=2, length_penalty="x"), r"length_penalty"),
    Bad("qkv.nn.AttentionCache", "capacity 0", lambda: qnn.AttentionCache(mha(), capacity=0), r"capacity must be >= 1"),
    Bad("qkv.nn.AttentionCache", "capacity bool", lambda: qnn.AttentionCache(mha(), capacity=True), r"capacity must be an int or None"),
    Bad("qkv.nn.AttentionCache", "owner str", lambda: qnn.AttentionCache("owner"), r"\bowner\b"),
    Bad("qkv.nn.KVCache", "owner str", lambda: qnn.KVCache("owner", []), r"\bowner\b"),
    Bad("qkv.nn.DecodingSession", "prefix str", lambda: qnn.DecodingSession(prefix="1 2", cache=None, decode=None), r"\bprefix\b"),
]  # fmt: skip

# ---- qkv.numpy ------------------------------------------------------------------------

A = np.ones((2, 3, 4))  # (B, T, D)


def _np_cache():
    return qnp.attention_forward(A, A, A)[1]


def _mha_params(E=4, **kw):
    return qnp.MultiHeadParams.init(E, 2, rng=0, **kw)


NUMPY = [
    Bad("qkv.numpy.attention_forward", "q 1-D", lambda: qnp.attention_forward(np.ones(4), A, A), r"\bq must have shape \(\.\.\., Tq, D\)"),
    Bad("qkv.numpy.attention_forward", "head dim", lambda: qnp.attention_forward(A, np.ones((2, 3, 5)), A), r"\bq and k must have the same head dim D"),
    Bad("qkv.numpy.attention_forward", "Tk of k and v", lambda: qnp.attention_forward(A, A, np.ones((2, 4, 4))), r"\bk and v must have the same length Tk"),
    Bad("qkv.numpy.attention_forward", "leading dims", lambda: qnp.attention_forward(A, np.ones((3, 3, 4)), np.ones((3, 3, 4))), r"leading dims of q, k and v do not broadcast"),
    Bad("qkv.numpy.attention_forward", "mask int", lambda: qnp.attention_forward(A, A, A, mask=np.ones((3, 3), int)), r"mask must be a bool array"),
    Bad("qkv.numpy.attention_forward", "mask shape", lambda: qnp.attention_forward(A, A, A, mask=np.ones((3, 4), bool)), r"mask of shape \(3, 4\) cannot be broadcast"),
    Bad("qkv.numpy.attention_forward", "scale inf", lambda: qnp.attention_forward(A, A, A, scale=math.inf), r"scale must be a finite number"),
    Bad("qkv.numpy.attention_forward", "dtype int", lambda: qnp.attention_forward(A, A, A, dtype=np.int32), r"dtype must be a floating dtype"),
    Bad("qkv.numpy.attention_forward", "causal str", lambda: qnp.attention_forward(A, A, A, causal="no"), r"\bcausal\b"),
    Bad("qkv.numpy.attention_backward", "dout shape", lambda: qnp.attention_backward(np.ones((2, 3, 5)), _np_cache()), r"dout must have the shape of out"),
    Bad("qkv.numpy.attention_backward", "cache str", lambda: qnp.attention_backward(A, "cache"), r"\bcache\b"),
    Bad("qkv.numpy.blocked_attention_forward", "block_q 0", lambda: qnp.blocked_attention_forward(A, A, A, block_q=0), r"block_q must be a positive integer"),
    Bad("qkv.numpy.blocked_attention_forward", "block_k float", lambda: qnp.blocked_attention_forward(A, A, A, block_k=2.5), r"block_k must be a positive integer"),
    Bad("qkv.numpy.blocked_attention_forward", "head dim", lambda: qnp.blocked_attention_forward(A, np.ones((2, 3, 5)), A), r"\bq and k must have the same head dim"),
    Bad("qkv.numpy.blocked_attention_backward", "out shape", lambda: qnp.blocked_attention_backward(A, A, A, A, np.ones((2, 3, 5)), np.ones((2, 3))), r"\bout must have shape \(\.\.\., Tq, Dv\)"),
    Bad("qkv.numpy.blocked_attention_backward", "lse shape", lambda: qnp.blocked_attention_backward(A, A, A, A, A, np.ones((2, 4))), r"lse must have shape \(\.\.\., Tq\)"),
    Bad("qkv.numpy.blocked_attention_backward", "block_q bool", lambda: qnp.blocked_attention_backward(A, A, A, A, A, np.ones((2, 3)), block_q=True), r"block_q must be a positive integer"),
    Bad("qkv.numpy.causal_mask", "tq < 0", lambda: qnp.causal_mask(-1, 3), r"\btq\b"),
    Bad("qkv.numpy.causal_mask", "tq float", lambda: qnp.causal_mask(1.5, 3), r"\btq\b"),
    Bad("qkv.numpy.check_gradient", "analytic shape", lambda: qnp.check_gradient(np.sum, np.ones(3), np.ones(4)), r"analytic must have the shape of x"),
    Bad("qkv.numpy.check_gradient", "eps 0", lambda: qnp.check_gradient(np.sum, np.ones(3), np.ones(3), eps=0.0), r"eps must be a positive finite number"),
    Bad("qkv.numpy.numerical_gradient", "eps nan", lambda: qnp.numerical_gradient(np.sum, np.ones(3), eps=math.nan), r"eps must be a positive finite number"),
    Bad("qkv.numpy.numerical_gradient", "f not scalar", lambda: qnp.numerical_gradient(lambda x: x, np.ones(3)), r"\bf must return a scalar"),
    Bad("qkv.numpy.softmax", "where int", lambda: qnp.softmax(np.ones((2, 3)), where=np.ones((2, 3), int)), r"where must be a bool array"),
    Bad("qkv.numpy.softmax", "where shape", lambda: qnp.softmax(np.ones((2, 3)), where=np.ones((2, 4), bool)), r"where of shape \(2, 4\) cannot be broadcast"),
    Bad("qkv.numpy.softmax", "axis", lambda: qnp.softmax(np.ones((2, 3)), axis=5), r"\baxis 5\b"),
    Bad("qkv.numpy.log_sum_exp", "where float", lambda: qnp.log_sum_exp(np.ones((2, 3)), where=np.ones((2, 3))), r"where must be a bool array"),
    Bad("qkv.numpy.multi_head_attention_forward", "query 2-D", lambda: qnp.multi_head_attention_forward(np.ones((3, 4)), A, A, _mha_params(), 2), r"query must have shape \(B, Tq, E\)"),
    Bad("qkv.numpy.multi_head_attention_forward", "batch", lambda: qnp.multi_head_attention_forward(A, np.ones((3, 3, 4)), np.ones((3, 3, 4)), _mha_params(), 2), r"query, key and value must have the same batch size B"),
    Bad("qkv.numpy.multi_head_attention_forward", "num_heads divides", lambda: qnp.multi_head_attention_forward(A, A, A, _mha_params(), 3), r"embed_dim \(4\) must be divisible by num_heads \(3\)"),
    Bad("qkv.numpy.multi_head_attention_forward", "num_heads float", lambda: qnp.multi_head_attention_forward(A, A, A, _mha_params(), 2.0), r"num_heads must be an int"),
    Bad("qkv.numpy.multi_head_attention_forward", "num_heads 0", lambda: qnp.multi_head_attention_forward(A, A, A, _mha_params(), 0), r"num_heads must be positive"),
    Bad("qkv.numpy.multi_head_attention_forward", "params shape", lambda: qnp.multi_head_attention_forward(A, A, A, _mha_params(E=6), 2), r"params.w_q must have shape \(4, 4\)"),
    Bad("qkv.numpy.multi_head_attention_forward", "params str", lambda: qnp.multi_head_attention_forward(A, A, A, "params", 2), r"\bparams\b"),
    Bad("qkv.numpy.multi_head_attention_backward", "dout shape", lambda: qnp.multi_head_attention_backward(np.ones((2, 3, 5)), qnp.multi_head_attention_forward(A, A, A, _mha_params(), 2)[1]), r"dout must have the shape of out"),
    Bad("qkv.numpy.MultiHeadParams.init", "num_heads divides", lambda: qnp.MultiHeadParams.init(4, 3), r"divisible by num_heads \(3\)"),
    Bad("qkv.numpy.MultiHeadParams.init", "dtype int", lambda: qnp.MultiHeadParams.init(4, 2, dtype=int), r"dtype must be a floating dtype"),
    Bad("qkv.numpy.MultiHeadParams.init", "embed_dim < 0", lambda: qnp.MultiHeadParams.init(-4), r"embed_dim"),
]  # fmt: skip

# ---- qkv.masks ------------------------------------------------------------------------

MASKS = [
    Bad("qkv.masks.causal", "argument", lambda: masks.causal(3), r"causal\(\) takes 0 positional arguments"),
    Bad("qkv.masks.window", "before < 0", lambda: masks.window(-1), r"window: before must be >= 0"),
    Bad("qkv.masks.window", "after < 0", lambda: masks.window(2, -2), r"window: after must be >= 0"),
    Bad("qkv.masks.window", "before float", lambda: masks.window(1.5), r"window: before must be an int"),
    Bad("qkv.masks.window", "after bool", lambda: masks.window(1, True), r"window: after must be an int"),
    Bad("qkv.masks.window", "before None", lambda: masks.window(None), r"window: before must be an int"),
    Bad("qkv.masks.padding", "length < 0", lambda: masks.padding([3, -1]), r"padding lengths must be >= 0"),
    Bad("qkv.masks.padding", "lengths 2-D", lambda: masks.padding([[1, 2]]), r"lengths must have 1 dimension"),
    Bad("qkv.masks.padding", "lengths float", lambda: masks.padding([1.5]), r"lengths must hold integers"),
    Bad("qkv.masks.padding", "lengths bool tensor", lambda: masks.padding(torch.tensor([True])), r"lengths must hold integers"),
    Bad("qkv.masks.padding", "lengths str", lambda: masks.padding("12"), r"lengths must be a tensor or a sequence of ints"),
    Bad("qkv.masks.padding", "lengths ragged", lambda: masks.padding([[1], [1, 2]]), r"lengths must be a tensor or a sequence of ints"),
    Bad("qkv.masks.document", "ids float", lambda: masks.document(t(2, 3)), r"\bids must hold integers"),
    Bad("qkv.masks.document", "ids 1-D", lambda: masks.document(long(3)), r"\bids must have 2 dimension"),
    Bad("qkv.masks.document", "kv_ids 3-D", lambda: masks.document(long(2, 3), long(2, 3, 1)), r"kv_ids must have 2 dimension"),
    Bad("qkv.masks.document", "kv_ids batch", lambda: masks.document(long(2, 3), long(3, 4)), r"document: ids \(2, 3\) and kv_ids \(3, 4\) must have the same batch size"),
    Bad("qkv.masks.from_dense", "float", lambda: masks.from_dense(t(3, 3)), r"from_dense expects a bool tensor"),
    Bad("qkv.masks.from_dense", "list", lambda: masks.from_dense([[True]]), r"from_dense expects a bool tensor; got list"),
    Bad("qkv.masks.from_dense", "5-D", lambda: masks.from_dense(torch.ones(1, 1, 1, 2, 2, dtype=torch.bool)), r"from_dense expects 1 to 4 dimensions"),
    Bad("qkv.masks.combine", "str", lambda: masks.combine(masks.causal(), "causal"), r"\bmasks?\b"),
    Bad("qkv.masks.And", "int part", lambda: masks.And(masks.causal(), 1), r"\bparts?\b|\bMask\b"),
    Bad("qkv.masks.Or", "tensor part", lambda: masks.Or(masks.causal(), torch.ones(2, 2, dtype=torch.bool)), r"\bparts?\b|\bMask\b"),
    Bad("qkv.masks.Not", "str", lambda: masks.Not("causal"), r"\binner\b|\bMask\b"),
    Bad("qkv.masks.Mask.to_dense", "padding B", lambda: masks.padding([1]).to_dense(2, 1, 3, 3), r"padding has 1 lengths but the batch has B=2"),
    Bad("qkv.masks.Mask.to_dense", "B < 0", lambda: masks.causal().to_dense(-1, 1, 2, 2), r"\bB\b"),
]  # fmt: skip

# ---- qkv.interop ----------------------------------------------------------------------

_TINY_BERT = dict(vocab_size=10, hidden_size=6, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=8, max_position_embeddings=8, type_vocab_size=2)  # fmt: skip


def _bert() -> Bert:
    return Bert(BertConfig(**_TINY_BERT)).eval()


def _bert_dir(tmp: str, config: dict | None = None, weights: bool = True) -> str:
    """A checkpoint directory written by hand (config.json and pytorch_model.bin)."""
    import pathlib
    import tempfile

    d = pathlib.Path(tempfile.mkdtemp(dir=tmp))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if weights:
        model = _bert()
        from qkv.interop.hf_bert import _hf_name

        state = {_hf_name(n): p.detach() for n, p in model.named_parameters()}
        state["embeddings.word_embeddings.weight"] = torch.zeros(3, 6)  # wrong shape
        torch.save(state, d / "pytorch_model.bin")
    return str(d)


INTEROP = [
    Bad("qkv.interop.load_hf_bert", "not a directory", lambda: load_hf_bert("/nonexistent/bert"), r"load_hf_bert: /nonexistent/bert is not a directory", FileNotFoundError),
    Bad("qkv.interop.load_hf_bert", "no config.json", lambda: load_hf_bert(_bert_dir(TMP)), r"load_hf_bert: no config.json", FileNotFoundError),
    Bad("qkv.interop.load_hf_bert", "no weights", lambda: load_hf_bert(_bert_dir(TMP, _TINY_BERT, weights=False)), r"no weights in .*model.safetensors or pytorch_model.bin", FileNotFoundError),
    Bad("qkv.interop.load_hf_bert", "model_type", lambda: load_hf_bert(_bert_dir(TMP, {**_TINY_BERT, "model_type": "gpt2"})), r"config.json describes a 'gpt2' model"),
    Bad("qkv.interop.load_hf_bert", "weight shape", lambda: load_hf_bert(_bert_dir(TMP, _TINY_BERT)), r"weight 'embeddings.word_embeddings.weight' has shape \(3, 6\)"),
    Bad("qkv.interop.load_hf_bert", "path int", lambda: load_hf_bert(123), r"\bpath\b"),
    Bad("qkv.interop.BertConfig.from_dict", "hidden_act", lambda: BertConfig.from_dict({"hidden_act": "tanh"}), r"hidden_act='tanh' is not supported"),
    Bad("qkv.interop.BertConfig.from_dict", "position_embedding_type", lambda: BertConfig.from_dict({"position_embedding_type": "relative_key"}), r"position_embedding_type='relative_key' is not supported"),
    Bad("qkv.interop.Bert", "heads", lambda: Bert(BertConfig(**{**_TINY_BERT, "num_attention_heads": 4})), r"num_heads \(4\)"),
    Bad("qkv.interop.Bert", "config str", lambda: Bert("bert-base"), r"\bconfig\b"),
    Bad("qkv.interop.Bert.forward", "input_ids 1-D", lambda: _bert()(long(4)), r"input_ids must be a \(B, T\) tensor"),
    Bad("qkv.interop.Bert.forward", "too long", lambda: _bert()(long(1, 9)), r"input_ids has T=9 tokens but the model knows 8 positions"),
    Bad("qkv.interop.Bert.forward", "attention_mask shape", lambda: _bert()(long(1, 4), attention_mask=long(1, 5)), r"attention_mask must have shape \(B, T\)=\(1, 4\)"),
    Bad("qkv.interop.Bert.forward", "token_type_ids shape", lambda: _bert()(long(1, 4), token_type_ids=long(2, 4)), r"token_type_ids must have shape"),
    Bad("qkv.interop.Bert.forward", "input_ids float", lambda: _bert()(t(1, 4)), r"input_ids"),
    Bad("qkv.interop.Bert.forward", "input_ids >= vocab_size", lambda: _bert()(long(1, 4) * 10), r"input_ids"),
    Bad("qkv.interop.Bert.forward", "token_type_ids >= type_vocab_size", lambda: _bert()(long(1, 4), token_type_ids=long(1, 4) * 2), r"token_type_ids must lie in \[0, type_vocab_size=2\)"),
]  # fmt: skip

TMP = "/tmp"  # replaced by a per-session directory in the fixture below

# ---- qkv.distributed (built by another engineer: audited when it is there) -------------

DISTRIBUTED = []
if qdist is not None:
    _S = t(1, 2, 4, 8)  # one rank's shard (B, H, S, D)

    def ring(**kw):
        call = {"q": _S, "k": _S, "v": _S, **kw}
        return _with_group(lambda: qdist.ring_attention(call.pop("q"), call.pop("k"),
                                                        call.pop("v"), **call))  # fmt: skip

    DISTRIBUTED = [
        Bad("qkv.distributed.ring_attention", "no process group", lambda: _without_group(lambda: qdist.ring_attention(_S, _S, _S)), r"ring_attention needs an initialised default process group", RuntimeError),
        Bad("qkv.distributed.ring_attention", "q list", lambda: ring(q=[1.0]), r"\bq must be a torch.Tensor"),
        Bad("qkv.distributed.ring_attention", "k int", lambda: ring(k=long(1, 2, 4, 8)), r"\bk must be a floating-point"),
        Bad("qkv.distributed.ring_attention", "lengths differ", lambda: ring(k=t(1, 2, 2, 8), v=t(1, 2, 2, 8)), r"their lengths \(dim -2\) must be equal on each rank"),
        Bad("qkv.distributed.ring_attention", "causal str", lambda: ring(causal="yes"), r"causal must be a bool"),
        Bad("qkv.distributed.ring_attention", "scale nan", lambda: ring(scale=math.nan), r"scale must be finite"),
        Bad("qkv.distributed.ring_attention", "layout", lambda: ring(layout="striped"), r"layout must be one of"),
        Bad("qkv.distributed.ring_attention", "zigzag odd shard", lambda: ring(q=t(1, 2, 3, 8), k=t(1, 2, 3, 8), v=t(1, 2, 3, 8), layout="zigzag"), r"layout='zigzag' needs"),
        Bad("qkv.distributed.ring_attention", "padding float", lambda: ring(padding=torch.tensor([1.0])), r"padding must be a 1-D integer tensor"),
        Bad("qkv.distributed.ring_attention", "padding B", lambda: ring(padding=[1, 2]), r"padding has 2 key lengths but the batch has B=1"),
        Bad("qkv.distributed.ring_attention", "padding > T", lambda: ring(padding=[5]), r"padding: key lengths are global and must lie in \[0, T=4\]"),
        Bad("qkv.distributed.ring_attention", "padding window", lambda: ring(padding=masks.window(2)), r"padding must be key lengths or qkv.masks.padding"),
        Bad("qkv.distributed.ring_attention", "overlap int", lambda: ring(overlap=1), r"overlap must be a bool"),
        Bad("qkv.distributed.ring_attention", "return_lse str", lambda: ring(return_lse="yes"), r"return_lse must be a bool"),
        Bad("qkv.distributed.ring_attention", "stats dict", lambda: ring(stats={}), r"stats must be a qkv.distributed.RingStats"),
        Bad("qkv.distributed.shard", "x list", lambda: qdist.shard([1, 2], 0, 2), r"\bx must be a torch.Tensor"),
        Bad("qkv.distributed.shard", "rank >= world_size", lambda: qdist.shard(t(4, 2), 2, 2), r"rank must lie in \[0, world_size=2\)"),
        Bad("qkv.distributed.shard", "world_size 0", lambda: qdist.shard(t(4, 2), 0, 0), r"world_size must be >= 1"),
        Bad("qkv.distributed.shard", "dim", lambda: qdist.shard(t(4, 2), 0, 2, dim=3), r"dim=3 is out of range for x"),
        Bad("qkv.distributed.shard", "not divisible", lambda: qdist.shard(t(5, 2), 0, 2), r"must be divisible by 2"),
        Bad("qkv.distributed.shard", "layout", lambda: qdist.shard(t(4, 2), 0, 2, layout="striped"), r"layout must be one of"),
        Bad("qkv.distributed.unshard", "empty", lambda: qdist.unshard([]), r"unshard: shards is empty"),
        Bad("qkv.distributed.unshard", "world_size missing", lambda: qdist.unshard(t(4, 2)), r"pass world_size="),
        Bad("qkv.distributed.unshard", "shapes differ", lambda: qdist.unshard([t(2, 2), t(3, 2)]), r"all shards must have one shape"),
        Bad("qkv.distributed.unshard", "not tensors", lambda: qdist.unshard([1, 2]), r"shards\[0\] must be a torch.Tensor"),
        Bad("qkv.distributed.unshard", "world_size mismatch", lambda: qdist.unshard([t(2, 2)], world_size=2), r"got 1 shards but world_size=2"),
        Bad("qkv.distributed.chunk_ranges", "rank < 0", lambda: qdist.chunk_ranges(-1, 2, 8), r"rank must be >= 0"),
        Bad("qkv.distributed.chunk_ranges", "seq_len float", lambda: qdist.chunk_ranges(0, 2, 8.0), r"seq_len must be an int"),
        Bad("qkv.distributed.positions", "world_size str", lambda: qdist.positions(0, "2", 8), r"world_size must be an int"),
        Bad("qkv.distributed.positions", "zigzag split", lambda: qdist.positions(0, 2, 6, layout="zigzag"), r"must be divisible by 4"),
        Bad("qkv.distributed.run_local", "world_size 0", lambda: qdist.run_local(print, 0), r"world_size must be >= 1"),
        Bad("qkv.distributed.run_local", "world_size str", lambda: qdist.run_local(print, "2"), r"world_size"),
        Bad("qkv.distributed.ddp.shard_indices", "n < 0", lambda: qdist.ddp.shard_indices(-1), r"need n >= 0 .*n=-1"),
        Bad("qkv.distributed.ddp.shard_indices", "rank >= world_size", lambda: qdist.ddp.shard_indices(4, rank=2, world_size=2), r"0 <= rank < world_size; .*rank=2"),
        Bad("qkv.distributed.ddp.shard_indices", "n float", lambda: qdist.ddp.shard_indices(1.5), r"\bn\b"),
        Bad("qkv.distributed.ddp.wrap", "model str", lambda: qdist.ddp.wrap("model"), r"\bmodel\b"),
    ]  # fmt: skip


_GROUP_OWNED = False


def _with_group(fn):
    """Run fn inside a one-rank gloo process group (made here, destroyed after the module)."""
    global _GROUP_OWNED
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        _GROUP_OWNED = True
    return fn()


def _without_group(fn):
    """Run fn with no process group (ours is destroyed; someone else's: skip)."""
    global _GROUP_OWNED
    if dist.is_initialized():
        if not _GROUP_OWNED:
            pytest.skip("a process group made elsewhere is initialised")
        dist.destroy_process_group()
        _GROUP_OWNED = False
    return fn()


@pytest.fixture(autouse=True, scope="module")
def _scratch_and_group(tmp_path_factory):
    global TMP
    TMP = str(tmp_path_factory.mktemp("audit"))
    yield
    if _GROUP_OWNED and dist.is_initialized():
        dist.destroy_process_group()


CASES: list[Bad] = [
    *ATTENTION, *ATTENTION_WEIGHTS, *EXPLAIN, *MHA, *MHA_FORWARD, *MHA_METHODS, *CLASSIC,
    *POSITIONAL, *LAYERS, *MODELS, *DECODING, *NUMPY, *MASKS, *INTEROP, *DISTRIBUTED,
]  # fmt: skip


def _param(case: Bad):
    marks = [pytest.mark.xfail(strict=True, reason=case.known)] if case.known else []
    return pytest.param(case, marks=marks, id=f"{case.entry} | {case.what}")


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input_is_rejected_naming_the_argument(case: Bad):
    with pytest.raises(case.exc, match=case.match):
        case.call()


def test_decoder_memory_may_be_none_only_once_the_cross_cache_is_filled():
    """The decoder-without-cross-attention pitfall: memory=None is refused (above) unless
    the cross-attention cache already holds the memory's keys and values; then it is the
    same as passing the memory again."""
    torch.manual_seed(0)
    decoder = qnn.TransformerDecoder(_decoder_layer(), 2).eval()
    memory = torch.randn(2, 4, 8)  # (B, S, E)
    steps = torch.randn(2, 2, 8)  # (B, T, E): two positions, fed one at a time
    with_memory, without = decoder.new_cache(), decoder.new_cache()
    decoder(steps[:, :1], memory, cache=with_memory)
    decoder(steps[:, :1], memory, cache=without)
    want = decoder(steps[:, 1:], memory, cache=with_memory)  # (B, 1, E)
    got = decoder(steps[:, 1:], None, cache=without)  # (B, 1, E)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- the meta-test: nothing public escapes the audit -----------------------------------

NAMESPACES = ["qkv", "qkv.masks", "qkv.nn", "qkv.nn.generate", "qkv.numpy", "qkv.interop"]
if qdist is not None:
    NAMESPACES += ["qkv.distributed", "qkv.distributed.ddp"]

# Public names with no validation row, each with the reason.
NOT_AUDITED = {
    "qkv.AttentionOutput": "frozen result dataclass, built only by the kernels",
    "qkv.KernelChoice": "frozen result dataclass returned by qkv.explain",
    "qkv.CheckReport": "frozen result dataclass returned by qkv.check",
    "qkv.nn.generate.Seq2Seq": "a mixin: its forward checks tokens, start_decoding goes through encode",
    "qkv.masks.EMPTY": "tile-kind constant",
    "qkv.masks.FULL": "tile-kind constant",
    "qkv.masks.PARTIAL": "tile-kind constant",
    "qkv.nn.AttentionContext": "NamedTuple result of the classic attention modules",
    "qkv.nn.BeamSearchResult": "frozen result dataclass of beam_search",
    "qkv.nn.Encoded": "frozen dataclass holding the encoder output, built by Transformer.encode",
    "qkv.nn.LayerCache": "frozen dataclass pairing two AttentionCaches, built by new_cache()",
    "qkv.numpy.AttentionCache": "frozen dataclass returned by attention_forward",
    "qkv.numpy.MultiHeadCache": "frozen dataclass returned by multi_head_attention_forward",
    "qkv.distributed.LAYOUTS": "tuple constant of layout names",
    "qkv.distributed.RingStats": "mutable counters dataclass (bytes sent, seconds)",
    "qkv.distributed.ddp.DistInfo": "frozen dataclass returned by info()/setup_from_env()",
    "qkv.distributed.ddp.info": "no arguments",
    "qkv.distributed.ddp.cleanup": "no arguments",
    "qkv.distributed.ddp.barrier": "no arguments",
    "qkv.distributed.ddp.setup_from_env": "reads torchrun's environment; initialises a real "
    "process group when WORLD_SIZE > 1, which a unit test must not do",
    "qkv.distributed.ddp.all_reduce_mean": "takes any number or tensor by design",
    "qkv.distributed.ddp.broadcast_object": "takes any picklable object by design",
    "qkv.distributed.ddp.unwrap": "the identity on anything that is not a DDP wrapper, by design",
}


def _resolve(path: str):
    """The object at a dotted path, read as attributes (qkv.numpy.softmax is the function)."""
    parts = path.split(".")
    obj = importlib.import_module(parts[0])
    for i, name in enumerate(parts[1:], start=2):
        if hasattr(obj, name):
            obj = getattr(obj, name)
        else:  # a submodule not imported by its package
            obj = importlib.import_module(".".join(parts[:i]))
    return obj


def _audited_objects() -> list:
    """Every object some case calls, and the classes whose methods a case calls."""
    objects = []
    for case in CASES:
        parts = case.entry.split(".")
        for i in range(2, len(parts) + 1):
            objects.append(_resolve(".".join(parts[:i])))
    return objects


def test_every_public_callable_is_audited():
    audited = _audited_objects()
    excluded = [_resolve(p) for p in NOT_AUDITED if qdist is not None or "distributed" not in p]
    missing = []
    for ns_name in NAMESPACES:
        ns = importlib.import_module(ns_name)
        for name in ns.__all__:
            obj = getattr(ns, name)
            path = f"{ns_name}.{name}"
            if isinstance(obj, types.ModuleType):
                assert obj.__name__ in NAMESPACES, f"{path}: public submodule not walked"
                continue
            if path in NOT_AUDITED or any(obj is a for a in audited + excluded):
                continue
            missing.append(path)
    assert not missing, f"public names with no validation case in tests/test_audit.py: {missing}"


def test_distributed_is_audited_when_present():
    if qdist is None:
        pytest.skip(DISTRIBUTED_MISSING)
    assert any(c.entry.startswith("qkv.distributed.") for c in CASES)


def test_the_audit_table_is_consistent():
    """Every exclusion still exists and has no cases; every case's entry is callable."""
    entries = {case.entry for case in CASES}
    for path in NOT_AUDITED:
        if path.startswith("qkv.distributed") and qdist is None:
            continue
        _resolve(path)  # raises if the name is gone
        assert path not in entries, f"{path} is both excluded and audited"
    for entry in entries:
        assert callable(_resolve(entry)), entry
