"""Worker process of `qkv check`: reads {"spec", "init"} on stdin, writes one JSON line.

The learner's prints go nowhere; the answer is {"report": ...} or {"error": "..."}.
"""

from __future__ import annotations

import ast
import io
import json
import sys


def main() -> int:
    request = json.loads(sys.stdin.read())
    out, sys.stdout = sys.stdout, io.StringIO()
    try:
        import torch

        torch.set_num_threads(1)  # tiny tensors
        from .api import check_spec
        from .loader import CheckError

        try:
            init = ast.literal_eval(request["init"])
            answer = {"report": check_spec(request["spec"], init).to_wire()}
        except CheckError as e:
            answer = {"error": str(e)}
    except BaseException as e:
        answer = {"error": f"{request['spec']}: {type(e).__name__}: {e}"}
    sys.stdout = out
    print(json.dumps(answer, default=_plain))
    return 0


def _plain(x):
    return float(x) if hasattr(x, "__float__") else str(x)


if __name__ == "__main__":
    sys.exit(main())
