"""`qkv.check` in process: the gallery's verdicts, variants outside it, the report forms.

Every gallery file says in its docstring what `qkv check` reports for it; the test holds the
checker to exactly that verdict (no false alarms on the correct ones, exactly the named id on
each buggy one). Variants that are not in the gallery (other parameter names, unbatched
inputs, returns in the other order, other module layouts) are written to tmp_path.
"""

from __future__ import annotations

import importlib.util
import json
import re
import textwrap
from pathlib import Path

import pytest
import torch

import qkv
from qkv.check import IDS, CheckError, CheckReport
from qkv.check.api import check_spec

GALLERY = Path(__file__).resolve().parents[1] / "examples" / "learners"
FILES = sorted(GALLERY.glob("*.py"))
VERDICT = re.compile(r"qkv check examples/learners/(\S+)\s+->\s+(.+?)\s+\(exit (\d)\)")


def expected(path: Path) -> tuple[set[str], int]:
    m = VERDICT.search(path.read_text())
    assert m, f"{path.name}: its docstring must say what qkv check reports"
    assert m.group(1) == path.name
    verdict, code = m.group(2), int(m.group(3))
    ids = set() if verdict == "every check passes" else set(verdict.split(", "))
    return ids, code


def needs(path: Path) -> None:
    if "einops" in path.read_text() and importlib.util.find_spec("einops") is None:
        pytest.skip("einops is not installed")


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_gallery_file_gets_exactly_its_verdict(path, one_thread):
    needs(path)
    ids, code = expected(path)
    report = check_spec(str(path), {})
    assert set(report.ids) == ids, report.text()
    assert (0 if report.ok else 1) == code
    statuses = {c.id: c.status for c in report.checks}
    assert all(statuses[i] == "fail" for i in ids)
    for f in report.findings:  # each finding points into the learner's file where it can
        if f.id not in ("wrong-output",):
            assert f.line is not None and 1 <= f.line <= len(path.read_text().splitlines())


def test_gallery_covers_every_id_and_has_a_correct_version_per_style():
    found = set().union(*(expected(p)[0] for p in FILES))
    assert found == set(IDS)
    correct = {p.stem for p in FILES if expected(p)[1] == 0}
    for style in (
        "torch_function",
        "torch_module",
        "numpy_function",
        "numpy_module",
        "einops_module",
    ):
        assert style in correct


def write(tmp_path: Path, source: str, name: str = "learner.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


VARIANTS = {
    # different parameter names, (weights, output) returned in the other order
    "renamed_reversed_returns": (
        """
        import math, torch
        def my_attention(queries, keys, values, attention_mask=None):
            s = torch.einsum("bqd,bkd->bqk", queries, keys) / math.sqrt(keys.shape[-1])
            if attention_mask is not None:
                s = s.masked_fill(~attention_mask, float("-inf"))
            w = s.softmax(-1).nan_to_num(0)
            return w, w @ values
        """,
        set(),
    ),
    # unbatched (L, d) only: q @ k.T
    "unbatched_torch": (
        """
        import torch
        def attention(q, k, v):
            return torch.softmax(q @ k.T / q.shape[1] ** 0.5, dim=1) @ v
        """,
        set(),
    ),
    "unbatched_no_scaling_reversed": (
        """
        import numpy as np
        def attn(Q, K, V):
            s = Q @ K.T
            w = np.exp(s - s.max(axis=1, keepdims=True))
            w = w / w.sum(axis=1, keepdims=True)
            return w, w @ V
        """,
        {"no-scaling"},
    ),
    # 1 = masked, filled with -1e9
    "masked_convention_minus_1e9": (
        """
        import math, torch
        def attention(q, k, v, mask=None):
            s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
            s = s.masked_fill(mask, -1e9) if mask is not None else s
            return s.softmax(-1) @ v
        """,
        {"masked-row-uniform"},
        "masked",
    ),
    "function_dropout": (
        """
        import math, torch
        import torch.nn.functional as F
        def attention(q, k, v):
            w = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1)
            return F.dropout(w, 0.2) @ v
        """,
        {"dropout-in-eval"},
    ),
    "causal_flag_correct": (
        """
        import math, torch
        def attention(q, k, v, is_causal=False):
            s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if is_causal:
                L = s.shape[-1]
                s = s.masked_fill(torch.ones(L, L).triu(1).bool(), float("-inf"))
            return s.softmax(-1) @ v
        """,
        set(),
    ),
    "causal_flag_leaks": (
        """
        import math, torch
        def attention(q, k, v, causal=False):
            s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if causal:
                L = s.shape[-1]
                s = s.masked_fill(torch.ones(L, L).tril().bool(), float("-inf"))  # inverted
            return s.softmax(-1).nan_to_num(0) @ v
        """,
        {"future-leak"},
    ),
    # causal, but each position is hidden from itself too: no leak, still wrong
    "causal_hides_the_diagonal": (
        """
        import math, torch
        def attention(q, k, v, causal=False):
            s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if causal:
                L = s.shape[-1]
                s = s.masked_fill(torch.ones(L, L).triu(0).bool(), float("-inf"))
            return s.softmax(-1).nan_to_num(0) @ v
        """,
        {"wrong-output"},
    ),
    # the Annotated Transformer's layout: four layers in a ModuleList, (q, k, v, mask)
    "modulelist_linears": (
        """
        import math, torch
        from torch import nn
        class MultiHeadedAttention(nn.Module):
            def __init__(self, h, d_model, dropout=0.1):
                super().__init__()
                self.h, self.d_k = h, d_model // h
                self.linears = nn.ModuleList([nn.Linear(d_model, d_model) for _ in range(4)])
                self.dropout = nn.Dropout(p=dropout)
            def forward(self, query, key, value, mask=None):
                B = query.size(0)
                q, k, v = [l(x).view(B, -1, self.h, self.d_k).transpose(1, 2)
                           for l, x in zip(self.linears, (query, key, value))]
                s = q @ k.transpose(-2, -1) / math.sqrt(self.d_k)
                if mask is not None:
                    s = s.masked_fill(mask == 0, float("-inf"))
                w = self.dropout(s.softmax(-1).nan_to_num(0))
                x = (w @ v).transpose(1, 2).contiguous().view(B, -1, self.h * self.d_k)
                return self.linears[-1](x)
        """,
        set(),
    ),
    "wraps_torch_mha": (
        """
        from torch import nn
        class Wrap(nn.Module):
            def __init__(self, embed_dim, num_heads):
                super().__init__()
                self.mha = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
            def forward(self, x):
                return self.mha(x, x, x)[0]
        """,
        set(),
    ),
    "fused_key_reuses_query_block": (
        """
        import torch
        from torch import nn
        class SelfAttention(nn.Module):
            def __init__(self, dim, heads):
                super().__init__()
                self.heads = heads
                self.qkv = nn.Linear(dim, 3 * dim)
            def forward(self, x):
                B, T, E = x.shape
                q, k, v = self.qkv(x).chunk(3, dim=-1)
                q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, q, v))
                w = torch.softmax(q @ k.transpose(-2, -1) / (E // self.heads) ** 0.5, -1)
                return (w @ v).transpose(1, 2).reshape(B, T, E)
        """,
        {"shared-projection"},
    ),
    "module_softmax_over_queries": (
        """
        import math, torch
        from torch import nn
        class Attention(nn.Module):
            def __init__(self, d_model):
                super().__init__()
                self.q, self.k, self.v = (nn.Linear(d_model, d_model) for _ in range(3))
            def forward(self, x):
                s = self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(x.shape[-1])
                return torch.softmax(s, dim=1) @ self.v(x)
        """,
        {"softmax-axis"},
    ),
    "plain_class_numpy_weights_transposed": (
        """
        import numpy as np
        class Attention:
            def __init__(self, d_model):
                rng = np.random.default_rng(1)
                self.Wq, self.Wk, self.Wv = (rng.normal(size=(d_model, d_model)) for _ in range(3))
            def __call__(self, x):  # unbatched (T, E); weights applied as x @ W.T
                q, k, v = x @ self.Wq.T, x @ self.Wk.T, x @ self.Wv.T
                s = q @ k.T / np.sqrt(q.shape[-1])
                e = np.exp(s - s.max(-1, keepdims=True))
                return (e / e.sum(-1, keepdims=True)) @ v
        """,
        set(),
    ),
    # right output, but the weights it returns were divided by sqrt(d) after the softmax
    "weights_scaled_after_softmax": (
        """
        import math, torch
        def attention(q, k, v):
            w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
            return w @ v, w / math.sqrt(q.shape[-1])
        """,
        {"scale-after-softmax"},
    ),
    # the head dim as a parameter, as interview answers write it
    "dim_parameter": (
        """
        import math, torch
        def attention(Q, K, V, d_k):
            return torch.softmax(Q @ K.transpose(-2, -1) / math.sqrt(d_k), dim=-1) @ V
        """,
        set(),
    ),
    # a key padding mask (B, T), 1 = real token
    "key_padding_mask": (
        """
        import math, torch
        from torch import nn
        class PadAttention(nn.Module):
            def __init__(self, d_model, num_heads):
                super().__init__()
                self.h = num_heads
                self.q, self.k, self.v = (nn.Linear(d_model, d_model) for _ in range(3))
            def forward(self, x, mask=None):
                B, T, E = x.shape
                q, k, v = (l(x).view(B, T, self.h, -1).transpose(1, 2) for l in (self.q, self.k, self.v))
                s = q @ k.transpose(-2, -1) / math.sqrt(E // self.h)
                if mask is not None:
                    s = s.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
                return (s.softmax(-1).nan_to_num(0) @ v).transpose(1, 2).reshape(B, T, E)
        """,
        set(),
        "keep",
    ),
    # BERT's additive attention_mask, a transpose_for_scores helper
    "bert_additive_mask": (
        """
        import math, torch
        from torch import nn
        class BertSelfAttention(nn.Module):
            def __init__(self, hidden_size, num_attention_heads, attention_probs_dropout_prob=0.1):
                super().__init__()
                self.num_attention_heads = num_attention_heads
                self.head = hidden_size // num_attention_heads
                self.query, self.key, self.value = (nn.Linear(hidden_size, hidden_size) for _ in range(3))
                self.dropout = nn.Dropout(attention_probs_dropout_prob)
            def transpose_for_scores(self, x):
                return x.view(x.size()[:-1] + (self.num_attention_heads, self.head)).permute(0, 2, 1, 3)
            def forward(self, hidden_states, attention_mask=None):
                q, k, v = (self.transpose_for_scores(l(hidden_states)) for l in (self.query, self.key, self.value))
                s = q @ k.transpose(-1, -2) / math.sqrt(self.head)
                if attention_mask is not None:
                    s = s + attention_mask
                c = (self.dropout(s.softmax(-1)) @ v).permute(0, 2, 1, 3)
                return c.reshape(c.shape[:2] + (-1,))
        """,
        set(),
        "additive",
    ),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_outside_the_gallery(name, tmp_path, one_thread):
    source, ids, *convention = VARIANTS[name]
    report = check_spec(write(tmp_path, source), {})
    assert set(report.ids) == ids, report.text()
    if convention:
        assert report.mask_convention == convention[0]


def test_scale_by_the_model_width_is_named_in_wrong_output(tmp_path, one_thread):
    path = write(
        tmp_path,
        """
        import math, torch
        from torch import nn
        class MHA(nn.Module):
            def __init__(self, d_model, num_heads):
                super().__init__()
                self.num_heads = num_heads
                self.W_q, self.W_k, self.W_v = (nn.Linear(d_model, d_model) for _ in range(3))
            def forward(self, x):
                B, T, E = x.shape
                q, k, v = (w(x).view(B, T, self.num_heads, -1).transpose(1, 2)
                           for w in (self.W_q, self.W_k, self.W_v))
                s = q @ k.transpose(-2, -1) / math.sqrt(E)  # the model width, not the head dim
                return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, E)
        """,
    )
    report = check_spec(path, {})
    assert report.ids == ["wrong-output"]
    assert "1/√8 (the model width)" in report.findings[0].message()


def test_python_api_takes_functions_classes_and_instances(one_thread):
    def attention(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v  # no 1/sqrt(d)

    assert qkv.check(attention).ids == ["no-scaling"]
    report = qkv.check(qkv.MultiHeadAttention, embed_dim=16, num_heads=4)
    assert report.ok, report.text()
    assert "embed_dim=16" in report.call
    # an instance is checked as it is; torch's own module: 1/True = masked, weights averaged
    # over heads, and NaN for a query whose keys are all masked (qkv's contract: 0)
    report = qkv.check(torch.nn.MultiheadAttention(8, 2, batch_first=True))
    assert report.mask_convention == "masked"
    assert report.ids == ["wrong-output"] and "NaN" in report.findings[0].message()


def test_python_api_rejects_what_is_not_a_target():
    with pytest.raises(TypeError, match="obj must be"):
        qkv.check(42)


@pytest.mark.parametrize(
    "source, match",
    [
        ("import no_such_module_qkv\n", r"cannot load .*ModuleNotFoundError.*no_such_module_qkv.*line 1"),
        ("def attention(q, k, v:\n", r"SyntaxError"),
        ("def helper(a, b):\n    return a\n", r"no attention-like"),
        ("def attn_a(q, k, v):\n    return q\n\ndef attn_b(q, k, v):\n    return q\n",
         r"several candidates: attn_a, attn_b"),
        ("def attention(q, k, v):\n    return q @ k\n", r"calling attention raised RuntimeError.*line 2"),
        ("class Attention:\n    def __init__(self, vocab):\n        pass\n"
         "    def __call__(self, x):\n        return x\n", r"--init vocab=VALUE"),
    ],
    ids=["import-error", "syntax-error", "no-candidate", "several", "call-raises", "needs-init"],
)  # fmt: skip
def test_cannot_load_build_or_call_is_a_check_error(source, match, tmp_path, one_thread):
    with pytest.raises(CheckError, match=match):
        check_spec(write(tmp_path, source), {})


def test_name_picks_one_of_several_and_unknown_init_is_refused(tmp_path, one_thread):
    path = write(tmp_path, "import math, torch\n"
                 "def attn_a(q, k, v):\n    return torch.softmax(q @ k.transpose(-2, -1), -1) @ v\n"
                 "def attn_b(q, k, v):\n    return q\n")  # fmt: skip
    assert check_spec(f"{path}:attn_a", {}).ids == ["no-scaling"]
    with pytest.raises(CheckError, match="defines no 'attn_c'"):
        check_spec(f"{path}:attn_c", {})
    with pytest.raises(CheckError, match="not a class"):
        check_spec(f"{path}:attn_a", {"d_model": 4})


def test_init_values_build_the_class(one_thread):
    report = check_spec(
        f"{GALLERY / 'torch_module.py'}:MultiHeadAttention", {"d_model": 12, "num_heads": 3}
    )
    assert report.ok and "d_model=12, num_heads=3" in report.call
    with pytest.raises(CheckError, match="takes no parameter 'width'"):
        check_spec(str(GALLERY / "torch_module.py"), {"width": 4})


def test_json_form_and_chinese_text(one_thread):
    report = check_spec(str(GALLERY / "torch_masked_fill.py"), {})
    d = json.loads(report.to_json("en"))
    assert set(d) >= {"target", "ok", "findings", "checks"}
    assert d["target"] == "attention" and d["ok"] is False
    assert [c["id"] for c in d["checks"]] == list(IDS)
    assert {c["status"] for c in d["checks"]} <= {"pass", "fail", "skip"}
    (f,) = d["findings"]
    assert set(f) >= {"id", "message", "line"} and f["id"] == "masked-row-uniform"
    assert isinstance(f["line"], int) and "1/7" in f["message"]
    zh = report.text("zh")
    assert "masked-row-uniform" in zh and "全部被遮住" in zh and "改法" in zh
    assert json.loads(report.to_json("zh"))["findings"][0]["message"] != f["message"]
    assert CheckReport.from_wire(json.loads(json.dumps(report.to_wire()))) == report
    with pytest.raises(ValueError, match="lang"):
        report.text("fr")


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_every_finding_points_to_sections_that_exist():
    from qkv.check import Finding

    docs = Path(__file__).resolve().parents[1] / "docs"
    anchors = {
        "pitfalls.md": _anchors(docs / "pitfalls.md"),
        "check.md": _anchors(docs / "check.md"),
    }
    for fid in IDS:
        for page in Finding(fid).docs:
            name, _, anchor = page.removeprefix("docs/").partition("#")
            assert anchor in anchors[name], page
