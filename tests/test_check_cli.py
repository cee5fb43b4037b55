"""`qkv check` on the command line: exit codes, --json, --lang zh, the time limit.

These run the learner's file in the worker process (about a second each for the import of
torch); the probes themselves are tested in process by tests/test_check.py.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from qkv import cli
from qkv.check import IDS

GALLERY = Path(__file__).resolve().parents[1] / "examples" / "learners"


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def in_process(monkeypatch):
    """The command line's glue without the worker process (its startup is torch's import)."""
    from qkv.check import api

    monkeypatch.setattr(api, "run_file", lambda spec, init, timeout: api.check_spec(spec, init))


@pytest.mark.parametrize(
    "path",
    [GALLERY / f"{name}.py" for name in ("torch_module", "numpy_function", "torch_no_scaling")],
    ids=lambda p: p.stem,
)
def test_exit_code_is_0_without_findings_and_1_with(path, in_process, capsys, one_thread):
    code, out, _ = run([str(path)], capsys)
    assert code == (0 if "every check passes" in path.read_text() else 1)
    assert out.count("✓") >= 6 and ("All applicable checks pass" in out) == (code == 0)


def test_correct_file_json_schema_and_init_values(in_process, capsys, one_thread):
    code, out, err = run([str(GALLERY / "torch_module.py"), "--json", "--init", "d_model=12",
                          "num_heads=3"], capsys)  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["target"] == "MultiHeadAttention" and report["ok"] is True
    assert report["findings"] == []
    assert [c["id"] for c in report["checks"]] == list(IDS)
    assert all(c["status"] in ("pass", "skip") for c in report["checks"])
    assert report["mask_convention"] == "keep" and "d_model=12" in report["call"]


def test_file_that_does_not_load_exits_2_with_one_line(tmp_path, in_process, capsys):
    path = tmp_path / "broken.py"
    path.write_text("import torch\nraise RuntimeError('half written')\n")
    code, out, err = run([str(path), "--json"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "half written (line 2)" in err and "Traceback" not in err
    assert json.loads(out) == {
        "target": str(path),
        "ok": False,
        "error": err.split("error: ", 1)[1].strip(),
        "findings": [],
        "checks": [],
    }


def test_worker_process_reports_in_chinese_json(capsys):
    """The whole path: the learner's file imported and run in the worker process."""
    code, out, _ = run([f"{GALLERY / 'numpy_global_max.py'}:attention", "--json", "--lang", "zh"],
                       capsys)  # fmt: skip
    assert code == 1
    report = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    (finding,) = report["findings"]
    assert finding["id"] == "global-max-softmax" and "下溢" in finding["message"]
    assert finding["line"] == 10 and report["ok"] is False


def test_endless_loop_is_stopped_by_the_time_limit(tmp_path, capsys):
    path = tmp_path / "loops.py"
    path.write_text(
        textwrap.dedent("""
        def attention(q, k, v):
            while True:
                pass
        """)
    )
    code, out, err = run([str(path), "--timeout", "3", "--json"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no result within 3 s" in lines[0] and "Traceback" not in err
    assert json.loads(out)["ok"] is False


@pytest.mark.parametrize(
    "argv, match",
    [
        (["f.py", "--init", "d_model"], r"--init.*KEY=VALUE"),
        (["f.py", "--init", "act=relu"], r"--init.*Python literal"),
        (["f.py", "--lang", "fr"], r"--lang"),
        (["f.py", "--timeout", "0"], r"--timeout"),
        (["f.py", "--init", "h=2", "h=3"], r"--init gives h twice"),
        ([], r"FILE"),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv, match, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert re.search(match, lines[0]), lines[0]
