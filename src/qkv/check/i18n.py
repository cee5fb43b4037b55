"""The words of `qkv check` in English and Chinese (the seed notes' readers); ids stay English.

Each finding has a message template filled from the numbers its probe saw, and a fix.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LANGS", "call_words", "finding_fix", "finding_message", "text"]

LANGS = ("en", "zh")

_TEXT = {
    "header": ("qkv check: {target}", "qkv check：{target}"),
    "called": ("called as {call}", "调用方式：{call}"),
    "convention_keep": (
        "mask convention found: 1/True = may attend (keep)",
        "推断出的 mask 约定：1/True = 可以关注（保留）",
    ),
    "convention_masked": (
        "mask convention found: 1/True = masked (hidden)",
        "推断出的 mask 约定：1/True = 被遮住（屏蔽）",
    ),
    "convention_additive": (
        "mask convention found: additive (added to the scores: 0 = may attend, -inf = hidden)",
        "推断出的 mask 约定：加性（加到分数上：0 = 可以关注，-inf = 屏蔽）",
    ),
    "additive_mask": (
        "an additive mask: the fill value is the caller's",
        "加性 mask：填充值由调用者决定",
    ),
    "skipped": ("  (skipped: {why})", "  （跳过：{why}）"),
    "line": (" (line {line})", "（第 {line} 行）"),
    "fix": ("Fix: ", "改法："),
    "see": ("See: ", "参见："),
    "all_pass": (
        "All applicable checks pass: it matches qkv.attention.",
        "所有适用的检查都通过：结果与 qkv.attention 一致。",
    ),
    "summary": (
        "{n} finding(s). The pitfalls are explained in {docs}.",
        "发现 {n} 个问题。这些陷阱的解释见 {docs}。",
    ),
    # why a check was skipped
    "no_mask": ("takes no mask", "不接受 mask"),
    "no_causal": ("no causal flag or mask to apply", "没有 causal 参数或 mask 可用"),
    "not_module": ("no projections (a plain function)", "没有投影层（普通函数）"),
    "one_head": ("one head", "只有一个头"),
    "no_weights": ("its q/k/v projections were not found", "没有找到 q/k/v 投影层"),
    "causal": ("causal: tokens cannot be permuted", "因果注意力：不能打乱 token 顺序"),
    "shape_failed": ("the shapes are already wrong", "形状已经不对"),
    "unknown_convention": ("the mask's convention could not be found", "无法判断 mask 约定"),
    "explained": ("explained by another finding", "已由其他问题解释"),
    "padding_mask": ("the mask is a key padding mask (N, Lk)", "mask 是按 key 的填充 mask (N, Lk)"),
    "call_raised": ("calling it this way raised an error", "这样调用时报错"),
}

_MESSAGES = {
    "shape": (
        "The {what} has shape {got} for these inputs; it should be {want}.",
        "对这组输入，{what_zh}的形状是 {got}，应该是 {want}。",
    ),
    "wrong-output": (
        "The output differs from qkv.attention on the same inputs by up to {err:.3g} "
        "(tolerance {tol:.1g}), and none of the known pitfalls explains it.",
        "同样的输入下，输出与 qkv.attention 最多相差 {err:.3g}（容差 {tol:.1g}），"
        "而且不是已知的任何一个陷阱。",
    ),
    "wrong-output-case": (
        "The output differs from qkv.attention in one case.",
        "有一种情况下输出与 qkv.attention 不一致。",
    ),
    "no-scaling": (
        "The output is softmax(QKᵀ)V: it differs from softmax(QKᵀ/√d)V by {err:.3g} but from "
        "the unscaled version by only {alt:.1g} (d = {d}). Without the 1/√d the scores grow "
        "like √d and the softmax saturates.",
        "输出是 softmax(QKᵀ)V：与 softmax(QKᵀ/√d)V 相差 {err:.3g}，而与不缩放的版本只差 "
        "{alt:.1g}（d = {d}）。不除以 √d，分数随 √d 增大，softmax 会饱和。",
    ),
    "scale-after-softmax": (
        "The 1/√d is applied after the softmax: {evidence} (d = {d}, 1/√d = {inv:.3g}). "
        "The weights no longer sum to 1 and the logits were never scaled.",
        "1/√d 是在 softmax 之后才乘上的：{evidence_zh}（d = {d}，1/√d = {inv:.3g}）。"
        "权重之和不再是 1，logits 也没有被缩放。",
    ),
    "softmax-axis": (
        "The softmax normalises over the queries (columns) instead of the keys (rows): "
        "{evidence}. Each query's weights over the keys must sum to 1: softmax over the last "
        "axis.",
        "softmax 是沿 query（列）归一化的，而不是沿 key（行）：{evidence_zh}。"
        "每个 query 对所有 key 的权重之和必须是 1：在最后一维上做 softmax。",
    ),
    "unstable-softmax": (
        "With scores up to {score:.0f} (inputs scaled up), {bad} of {total} output values are "
        "inf or NaN, while qkv's are finite: exp overflows unless each row's maximum is "
        "subtracted first.",
        "当分数大到 {score:.0f}（放大输入）时，{total} 个输出值中有 {bad} 个是 inf 或 NaN，"
        "而 qkv 的结果是有限的：不先减去每行的最大值，exp 就会溢出。",
    ),
    "global-max-softmax": (
        "One query row has scores up to {score:.0f}, the others near 0: {bad} of {rows} "
        "other rows come out NaN or wrong. One maximum for the whole "
        "matrix makes every exp of those rows underflow to 0, and 0/0 = NaN.",
        "一行 query 的分数高达 {score:.0f}，其余行接近 0：其他 {rows} 行中有 {bad} 行变成 "
        "NaN 或出错。对整个矩阵只减一个最大值，会让这些行的 exp 全部"
        "下溢为 0，而 0/0 = NaN。",
    ),
    "masked-row-uniform": (
        "A query row whose {lk} keys are all masked gets uniform weights 1/{lk} = {w:.3g}: "
        "its output is the mean of all the values, instead of attending to nothing (qkv's "
        "output for that row is 0, before any output projection). A fill of -1e9 leaves "
        "all its scores equal.",
        "一行 query 的 {lk} 个 key 全部被遮住时，得到了均匀权重 1/{lk} = {w:.3g}："
        "它的输出是所有 value 的平均值，而不是不关注任何位置（qkv 对这一行的输出为 0，"
        "在输出投影之前）。用 -1e9 填充会让这一行的分数全部相等。",
    ),
    "shared-projection": (
        "Changing the weights of {name} (the {role} projection) does not change the output "
        "at all: the {role_words} do not go through their own projection (another layer, "
        "usually the query's, is reused).",
        "改变 {name}（{role_zh} 投影）的权重，输出完全不变：{role_zh}没有经过自己的"
        "投影层（复用了别的层，通常是 query 的）。",
    ),
    "heads-split-on-sequence": (
        "Permuting the {n} input tokens does not permute the output the same way (error "
        "{err:.3g}; {heads} heads): the heads are split along the sequence axis, so each head "
        "sees only part of the sentence. Split the feature axis: "
        "(N, L, E) -> (N, L, H, E/H) -> (N, H, L, E/H).",
        "把 {n} 个输入 token 打乱顺序，输出没有以同样方式打乱（误差 {err:.3g}；{heads} 个头）："
        "多头是沿序列维切分的，每个头只看到句子的一部分。应该切分特征维："
        "(N, L, E) -> (N, L, H, E/H) -> (N, H, L, E/H)。",
    ),
    "dropout-in-eval": (
        "Two identical calls in eval mode differ by up to {err:.3g}: dropout is still active "
        "(e.g. F.dropout without training=self.training, or a dropout with its own flag).",
        "eval 模式下两次完全相同的调用结果相差 {err:.3g}：dropout 仍然生效"
        "（例如 F.dropout 没有传 training=self.training）。",
    ),
    "future-leak": (
        "Asked to be causal ({how}), output position {i} still changes (by {delta:.3g}) when "
        "position {j}, a later one, changes: the mask lets queries see the future.",
        "要求因果注意力（{how}）时，第 {i} 个输出在后面的第 {j} 个位置改变时仍然变化"
        "（变化 {delta:.3g}）：mask 让 query 看到了未来。",
    ),
}

_HINTS = {
    "width_scale": (
        " It matches the scale 1/√{e} (the model width) instead of 1/√{d} (the head dim).",
        " 它与缩放 1/√{e}（模型宽度）一致，而不是 1/√{d}（每个头的维度）。",
    ),
    "causal_differs": (
        " Asked to be causal ({how}), it sees no later position, but its output differs from "
        "qkv's causal attention by {cerr:.3g} (does each position see itself?).",
        " 要求因果注意力（{how}）时它没有看到后面的位置，但输出与 qkv 的因果注意力相差 "
        "{cerr:.3g}（每个位置能看到自己吗？）。",
    ),
    "nan_row": (
        " A query row whose keys are all masked comes out NaN; qkv gives 0 (no attention).",
        " 所有 key 都被遮住的 query 行输出了 NaN；qkv 给出 0（不关注任何位置）。",
    ),
    "mask_ignored": (
        " The mask has no effect: every output depends on every key.",
        " mask 没有任何作用：每个输出都依赖所有 key。",
    ),
    "mask_odd": (
        " The positions the output depends on match neither 1/True = keep nor 1/True = masked.",
        " 输出依赖的位置既不符合 1/True = 保留，也不符合 1/True = 屏蔽。",
    ),
    "unused": (
        " `{name}` has no effect on the output.",
        " `{name}` 对输出没有任何影响。",
    ),
    "weights": (
        " The returned weights differ from qkv's by {werr:.3g}.",
        " 返回的权重与 qkv 的相差 {werr:.3g}。",
    ),
}

_FIXES = {
    "shape": (
        "return (output, weights) with output (..., Lq, Dv).",
        "返回形状为 (..., Lq, Dv) 的输出。",
    ),
    "wrong-output": (
        "compare step by step with softmax(QKᵀ/√d)V (qkv shapes prints every step).",
        "逐步与 softmax(QKᵀ/√d)V 对照（qkv shapes 会打印每一步）。",
    ),
    "no-scaling": (
        "scores = q @ k.transpose(-2, -1) / math.sqrt(d)",
        "scores = q @ k.transpose(-2, -1) / math.sqrt(d)",
    ),
    "scale-after-softmax": (
        "divide the scores by √d before the softmax, not the weights after it.",
        "在 softmax 之前把分数除以 √d，而不是之后去除权重。",
    ),
    "softmax-axis": (
        "softmax(scores, dim=-1)  (NumPy: axis=-1)",
        "softmax(scores, dim=-1)（NumPy：axis=-1）",
    ),
    "unstable-softmax": (
        "e = exp(s - s.max(-1, keepdim=True)), or torch.softmax.",
        "e = exp(s - s.max(-1, keepdim=True))，或直接用 torch.softmax。",
    ),
    "global-max-softmax": (
        "subtract each row's own maximum: s.max(-1, keepdim=True) (NumPy: axis=-1, keepdims=True).",
        "减去每一行自己的最大值：s.max(-1, keepdim=True)（NumPy：axis=-1, keepdims=True）。",
    ),
    "masked-row-uniform": (
        "fill with -inf and zero the rows that have no key: w = softmax(s).nan_to_num(0), "
        "or multiply the weights by the mask.",
        "用 -inf 填充，并把没有可见 key 的行置 0：w = softmax(s).nan_to_num(0)，"
        "或把权重乘以 mask。",
    ),
    "shared-projection": (
        "q, k, v = self.W_q(x), self.W_k(x), self.W_v(x)",
        "q, k, v = self.W_q(x), self.W_k(x), self.W_v(x)",
    ),
    "heads-split-on-sequence": (
        "q = q.view(N, L, H, E // H).transpose(1, 2)  # (N, H, L, D)",
        "q = q.view(N, L, H, E // H).transpose(1, 2)  # (N, H, L, D)",
    ),
    "dropout-in-eval": (
        "use nn.Dropout (off in eval()) or F.dropout(w, p, training=self.training).",
        "用 nn.Dropout（eval() 时自动关闭），或 F.dropout(w, p, training=self.training)。",
    ),
    "future-leak": (
        "mask key j for query i when j > i: torch.ones(L, L).tril() as the keep mask.",
        "当 j > i 时遮住 key j：用 torch.ones(L, L).tril() 作为保留 mask。",
    ),
}

_WORDS_ZH = {"output": "输出", "weights": "权重", "q": "query", "k": "key", "v": "value"}
_ROLE_WORDS = {"q": "queries", "k": "keys", "v": "values"}


def _pick(pair: tuple[str, str], lang: str) -> str:
    return pair[LANGS.index(lang)]


_CALL_ZH = (
    ("torch tensors", "torch 张量"),
    ("NumPy arrays", "NumPy 数组"),
    (" unbatched", "（无 batch 维）"),
    (" built with ", "，构造参数 "),
)


def call_words(call: str, lang: str) -> str:
    """The report's "called as" description in `lang` (names and shapes stay as they are)."""
    if lang == "zh":
        for en, zh in _CALL_ZH:
            call = call.replace(en, zh)
    return call


def text(key: str, lang: str, **values: Any) -> str:
    """A fixed phrase of the report (unknown keys are returned as they are)."""
    pair = _TEXT.get(key)
    return _pick(pair, lang).format(**values) if pair else key


def finding_message(fid: str, data: dict[str, Any], lang: str) -> str:
    """The paragraph for finding `fid`, filled with the numbers in `data`."""
    values = {"what_zh": _WORDS_ZH.get(data.get("what", ""), ""), **data}
    roles = [r for r in data.get("role", "").split(",") if r]
    values.setdefault("role_words", " and ".join(_ROLE_WORDS.get(r, r) for r in roles))
    values.setdefault("role_zh", "、".join(_WORDS_ZH.get(r, r) for r in roles))
    values["role"] = "/".join(roles)
    if "evidence" in data:
        values["evidence"], values["evidence_zh"] = _evidence(fid, data)
    key = "wrong-output-case" if fid == "wrong-output" and data.get("err") is None else fid
    message = _pick(_MESSAGES[key], lang).format(**values)
    for hint in data.get("hints", ()):
        message += _pick(_HINTS[hint], lang).format(**values)
    return message


def finding_fix(fid: str, lang: str) -> str:
    return _pick(_FIXES[fid], lang)


_FORMULAS = {
    "scale-after-softmax": ("softmax(QKᵀ)V/√d", "softmax(QKᵀ)V/√d"),
    "softmax-axis": ("the softmax over the queries", "沿 query 做 softmax 的结果"),
}


def _evidence(fid: str, data: dict[str, Any]) -> tuple[str, str]:
    kind = data["evidence"]
    if kind == "row_sums":
        lo, hi = data["lo"], data["hi"]
        return (
            f"the weights' rows sum to {lo:.3g}..{hi:.3g} instead of 1",
            f"权重每行之和为 {lo:.3g}..{hi:.3g}，而不是 1",
        )
    if kind == "col_sums":
        return (
            f"the weights' columns sum to 1 and rows to {data['lo']:.3g}..{data['hi']:.3g}",
            f"权重每列之和为 1，每行之和为 {data['lo']:.3g}..{data['hi']:.3g}",
        )
    err, alt = data["err"], data["alt"]
    en, zh = _FORMULAS[fid]
    return (
        f"the output differs from qkv's by {err:.3g} but from {en} by only {alt:.1g}",
        f"输出与 qkv 相差 {err:.3g}，而与 {zh} 只差 {alt:.1g}",
    )
