"""What `qkv bench` prints and writes: the machine line, the table, the plot, and the
checks of where results go (made before anything is measured)."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform

import torch

__all__ = ["check_output_dir", "check_output_file", "format_table", "machine_line", "plot_sweep"]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.1f} ms"


def machine_line() -> str:
    """The CPU, the ISA the native kernel uses, threads and torch: every figure says where
    it came from."""
    from qkv.kernels import native

    cpu = platform.processor() or platform.machine()
    try:
        info = dict(
            (part.strip() for part in line.split(":", 1))
            for line in pathlib.Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
            if ":" in line
        )
        cpu = f"{info['model name']} (family {info['cpu family']}, model {info['model']})"
    except (OSError, KeyError, ValueError):
        pass
    isa, why = native.isa()
    flags = native._cpu_flags()
    extras = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    isa_text = f"native kernel: {isa}" if isa else f"no native kernel ({why})"
    if extras:
        isa_text += " (+" + ", ".join(extras) + ")"
    return (
        f"{cpu}, {os.cpu_count()} cores, {isa_text}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )


def format_table(cases: list, gemm: dict) -> str:
    """The results of run cases (qkv.bench.Case) as a markdown table under the machine line."""
    lines = [
        "| case | shape (B, H, Tq, Tk, D) | contender | time | × sdpa | GEMM % | peak |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for c in cases:
        shape = f"({c.B}, {c.H}, {c.Tq}, {c.Tk}, {c.D}) {str(c.dtype).replace('torch.', '')}"
        for name, r in c.results.items():
            if not isinstance(r, dict):
                continue
            ratio = f"{r['vs_sdpa']:.2f}" if r["vs_sdpa"] else "—"
            peak = r.get("peak_mib")
            peak = "—" if peak is None else f"{peak:.0f} MiB"
            lines.append(
                f"| {c.name} | {shape} | {name} | {_ms(r['seconds'])} | {ratio} | "
                f"{100 * r['gemm_fraction']:.0f}% | {peak} |"
            )
        if "flex-compile-seconds" in c.results:
            lines.append(
                f"| {c.name} | | flex compile | {c.results['flex-compile-seconds']:.1f} s | | | |"
            )
    header = f"{datetime.date.today().isoformat()}, {machine_line()}; GEMM " + ", ".join(
        f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in gemm.items()
    )
    return header + "\n\n" + "\n".join(lines)


def plot_sweep(sweeps, path) -> None:
    """Save time against length, one panel per mask, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4), squeeze=False)
    for ax, (mask, series) in zip(axes[0], sweeps.items(), strict=True):
        for contender, points in series.items():
            ax.plot(*zip(*points, strict=True), marker="o", label=contender)
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="seconds",
               title=f"{mask}, forward (B=1, H=4, D=64)")  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_output_file(parser, arg: str, path: str) -> None:
    """A usage error unless `path` names a file that can be written (its folder exists)."""
    target = pathlib.Path(path)
    if not path.strip():
        parser.error(f"{arg} needs a file name; got an empty string")
    if target.is_dir():
        parser.error(f"{arg} {path!r} is a directory; give a file name inside it")
    folder = target.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        parser.error(f"{arg} {path!r}: cannot write into {str(folder)!r} (no such writable folder)")


def check_output_dir(parser, arg: str, path: str) -> None:
    """A usage error unless `path` is a writable folder or one that can be made."""
    target = pathlib.Path(path)
    if not path.strip():
        parser.error(f"{arg} needs a folder; got an empty string")
    if target.exists() and not target.is_dir():
        parser.error(f"{arg} {path!r} is a file; give a folder (it is created if missing)")
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        parser.error(f"{arg} {path!r}: cannot create or write it (check the folder's permissions)")
