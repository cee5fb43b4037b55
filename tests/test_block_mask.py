"""qkv masks exported to torch's FlexAttention: `mask_mod`, `to_block_mask`, and the
dispatch's route to compiled FlexAttention on CUDA.

Every mask kind and combination at awkward lengths (not multiples of the block size,
Tq != Tk for the bottom-right alignment) runs through FlexAttention's own (eager)
implementation against `qkv.attention`; compiled `flex_attention` (CPU inductor) runs one
mask that combines them all, compilation being slow, and is skipped with the reason where inductor cannot
compile here. No GPU is needed: the CUDA route is tested with its device check patched.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import qkv
from conftest import make_qkv
from qkv import masks
from qkv.kernels import flex

fa = pytest.importorskip("torch.nn.attention.flex_attention")

B, H, D = 2, 2, 16


def _ids(T: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 4, (B, T), generator=g).sort(-1).values  # packed documents


def _cases(Tq: int, Tk: int) -> dict:
    ids, kv_ids = _ids(Tq), _ids(Tk)
    pad = masks.padding([0, Tk - 9])  # batch 0 sees nothing
    return {
        "causal": masks.causal(),
        "window": masks.window(20, 3),
        "documents&causal&padding": masks.document(ids, kv_ids) & masks.causal() & pad,
        "window|~padding": masks.window(5) | ~pad,
        # every primitive in one mask_mod: one compilation covers them all
        "all": (masks.document(ids, kv_ids) & masks.causal() & pad) | (masks.window(20, 3) & pad),
        "dense": masks.from_dense(torch.rand(B, 1, Tq, Tk, generator=torch.Generator()) > 0.4),
    }


def _eager_flex(q, k, v, bm):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile()"
        out, aux = fa.flex_attention(q, k, v, block_mask=bm, return_aux=fa.AuxRequest(lse=True))
    return out, aux.lse


def test_block_mask_and_mask_mod_equal_qkv():
    Tq, Tk = 150, 200
    q, k, v = (t.detach() for t in make_qkv((B, H, H, Tq, Tk, D, D), torch.float32))
    for name, m in _cases(Tq, Tk).items():
        bm = m.to_block_mask(B, H, Tq, Tk, block_size=64)
        # the BlockMask skips exactly the tiles where the mask allows nothing
        dense = m.to_dense(B, H, Tq, Tk)
        pad = torch.zeros(B, H, -(-Tq // 64) * 64, -(-Tk // 64) * 64, dtype=torch.bool)
        pad[:, :, :Tq, :Tk] = dense
        live = pad.unflatten(2, (-1, 64)).unflatten(4, (-1, 64)).any(5).any(3)
        assert torch.equal(bm.to_dense().bool(), live), name
        out, lse = _eager_flex(q, k, v, bm)
        want = qkv.attention(q, k, v, mask=m, return_lse=True)
        torch.testing.assert_close(out, want.output, rtol=1e-5, atol=2e-6, msg=name)
        live_rows = torch.isfinite(want.lse)
        assert torch.equal(torch.isfinite(lse), live_rows), name
        torch.testing.assert_close(lse[live_rows], want.lse[live_rows], msg=name)


def test_to_block_mask_validates():
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        masks.causal().to_block_mask(1, 1, 8, 8, block_size=0)
    with pytest.raises(ValueError, match="Tq must be an int >= 1"):
        masks.causal().to_block_mask(1, 1, 0, 8)
    with pytest.raises(ValueError, match="padding has 1 lengths but the batch has B=2"):
        masks.padding([3]).to_block_mask(2, 1, 8, 8)


def _compiled_or_skip(fn):
    try:
        return fn()
    except Exception as err:  # inductor needs a working C++ toolchain for the CPU
        if type(err).__name__ in ("InductorError", "BackendCompilerFailed", "CppCompileError"):
            pytest.skip(f"torch's inductor cannot compile flex_attention here: {err!s:.200}")
        raise


# One shape and one mask for the compiled calls below, so that the second reuses the
# first one's compilation: Tk > 2048 keys, where the dispatch sends a structured mask past
# torch's fused kernel.
Tq_C, Tk_C = 64, 2100


@pytest.fixture(scope="module")
def compiled_case():
    q, k, v = (t.detach() for t in make_qkv((B, H, 1, Tq_C, Tk_C, D, D), torch.float32))
    return q, k, v, _cases(Tq_C, Tk_C)["all"]


def test_compiled_flex_attention_with_an_exported_mask(compiled_case):
    q, k, v, m = compiled_case
    bm = m.to_block_mask(B, H, Tq_C, Tk_C)
    out = _compiled_or_skip(lambda: flex._flex()(q, k, v, block_mask=bm, enable_gqa=True))
    want = qkv.attention(q, k, v, mask=m)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-6)
    assert (out[0] == 0).all()  # padding length 0: every row of batch 0 sees nothing


def test_cuda_routes_structured_masks_to_flex(compiled_case, monkeypatch):
    """With the device check patched (no GPU here), a structured mask over many tiles goes
    to the flex kernel, which runs compiled FlexAttention; the common masks stay on
    torch's fused kernel, and explain says which and why."""
    q, k, v, m = compiled_case
    monkeypatch.setattr(flex, "on_gpu", lambda p: True)
    choice = qkv.explain(q, k, v, mask=m)
    assert choice.name == "flex", choice
    assert qkv.explain(q, k, v, causal=True).name != "flex"
    assert qkv.explain(q, k, v, mask=masks.padding([1000, 2000])).name == "fused"
    assert "weights" in qkv.explain(q, k, v, mask=m, return_weights=True).reason
    out = _compiled_or_skip(lambda: qkv.attention(q, k, v, mask=m))
    want = qkv.attention(q, k, v, mask=m, kernel="reference")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-6)
    monkeypatch.undo()
    on_cpu = qkv.explain(q, k, v, mask=m)
    assert on_cpu.name == "tiled" and "not flex: CUDA only" in on_cpu.reason
