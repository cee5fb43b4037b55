"""`qkv.check`: grade a hand-written attention against qkv and name the mistake.

    report = qkv.check(my_attention)                 # a function f(q, k, v[, mask])
    report = qkv.check(MyMHA, d_model=16, heads=4)   # a class, built from these values
    report = qkv.check("my_attn.py:MyMHA")           # a file, run in a worker process
    print(report.text())                             # ✓/✗ per check, findings with numbers
    report.ok, report.ids                            # True/False, ["no-scaling", ...]

Finding ids: shape, wrong-output, no-scaling, scale-after-softmax, softmax-axis,
unstable-softmax, global-max-softmax, masked-row-uniform, shared-projection,
heads-split-on-sequence, dropout-in-eval, future-leak (docs/check.md says how each probe
decides; docs/pitfalls.md explains the mistakes).
"""

from .api import check, run_file
from .loader import CheckError
from .report import IDS, Check, CheckReport, Finding

__all__ = ["IDS", "Check", "CheckError", "CheckReport", "Finding", "check", "run_file"]
