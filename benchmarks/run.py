"""Benchmark runner: ``python -m benchmarks.run --preset tiny|cpu-small|paper [--out DIR]``.

In one process and one run, for each case of the preset: the median time of every
implementation that can run it (the idiomatic PyTorch a user would write and torch.compile
of it, the eager reference, every kernel backend that registered the op,
linear-cross-entropy competitors for the class loss), its peak extra
memory (CUDA: max_memory_allocated delta; CPU: VmHWM growth in a fresh subprocess), the
floor (bare GEMMs, timed in the same run) and on GPU the minimal bytes moved against a
measured device copy. Writes ``<preset>-<device>.json``, ``.md`` (ratio table) and
``.png`` (time and memory against N and C) under ``--out``; ``<device>`` is ``cpu`` or the
GPU's name (``nvidia-h200``). ``--no-memory`` skips the memory measurement (``mem_bytes``
null), for smoke runs.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import re
import sys
from pathlib import Path

import torch

from . import cases, measure
from .cases import Case
from .presets import PRESETS

SCHEMA = 1
# The baselines of the ratios: what a user would pick instead (benchmarks/cases.py).
RATIO_BASES = {"eager": "eager", "compile": "compile", "lce": "lce", "liger": "liger",
               "cce": "cce"}


def _measure_case(case: Case, impls: list[str], device: torch.device, threads: int,
                  budget_s: float, bar, memory: bool = True) -> dict:
    x = cases.make_inputs(case, device)
    row = {"op": case.op, "mode": case.mode, "label": case.label(), "case": case.as_dict(),
           "impls": {}, "skipped": {}, "failed": {}}
    floor_fn, what = cases.floor(case, x)
    row["floor"] = {"what": what, "time_ms": 1e3 * measure.median_time(floor_fn, device,
                                                                      budget_s=budget_s)[0]}
    del floor_fn
    bar.update()
    for impl in impls:
        why = cases.unavailable(case, impl, device)
        if why is not None:
            row["skipped"][impl] = why
            bar.update()
            continue
        bar.set_postfix_str(f"{case.op} {case.mode} {impl}")
        try:
            fn = cases.runner(case, impl, x)
            t, reps = measure.median_time(fn, device, budget_s=budget_s)
            if not memory:
                mem = None
            elif device.type == "cuda":
                mem = int(measure.cuda_peak_extra(fn))
            else:
                mem = int(measure.cpu_peak_extra(case.as_dict(), impl, threads))
            row["impls"][impl] = {"time_ms": 1e3 * t, "reps": reps, "mem_bytes": mem}
        except Exception as exc:  # noqa: BLE001  e.g. eager OOM, a competitor's API change:
            # recorded in the results instead of ending a long run
            row["failed"][impl] = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            for t in x.values():
                t.grad = None
            fn = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        bar.update()
    return row


def ratios(row: dict) -> dict:
    """Per implementation: time / eager, / compile, / LCE, / Liger, / CCE, / floor (and
    / bandwidth floor on GPU), and peak extra memory / eager's. Only ratios whose base was
    measured and is positive."""
    out = {}
    imp = row["impls"]
    for name, r in imp.items():
        q = {}
        for key, base in RATIO_BASES.items():
            if base in imp and base != name:
                q[key] = r["time_ms"] / imp[base]["time_ms"]
        q["floor"] = r["time_ms"] / row["floor"]["time_ms"]
        if row.get("peak_gflops") and row.get("gflop"):
            q["peak"] = row["gflop"] / (r["time_ms"] / 1e3) / row["peak_gflops"]
        if "bw_time_ms" in row:
            q["bandwidth"] = r["time_ms"] / row["bw_time_ms"]
        if ("eager" in imp and name != "eager" and r["mem_bytes"] is not None
                and (imp["eager"]["mem_bytes"] or 0) > 0):
            q["mem"] = r["mem_bytes"] / imp["eager"]["mem_bytes"]
        out[name] = q
    return out


def markdown(result: dict) -> str:
    env = result["env"]
    m, v = env["machine"], env["versions"]
    lines = [f"# Benchmarks: preset `{result['preset']}` on {result['device']}", "",
             f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads)"
             + (f", {m['gpu']}" if m["gpu"] else "")
             + f"; torch {v['torch']}, triton {v['triton']}; commit "
             f"{(env['git']['commit'] or '?')[:10]}{' (dirty)' if env['git']['dirty'] else ''};"
             f" {env['date']}.", "",
             "Square-GEMM peak in this run (n = " + str(result["gemm_peak_n"]) + "): "
             + ", ".join(f"{dt} {v:.0f} GFLOP/s" for dt, v in result["gemm_peak_gflops"].items())
             + ".", "",
             "Times are medians; `x eager` etc. are this row's time over that implementation's "
             "(below 1 is faster); `x floor` is over the bare GEMMs (or copies) the op needs, "
             "timed in the same run; `% peak` is the op's matrix-product FLOP/s as a share of "
             "a square GEMM of the same dtype timed in the same run (the machine's peak); "
             "memory is the peak extra memory of one call and "
             "`mem x eager` its ratio to eager's. `eager` is the idiomatic PyTorch a user would "
             "write instead (`F.cross_entropy` on the logits; soft-target `F.cross_entropy` "
             "for consistency), `compile` its `torch.compile`; `reference` is this "
             "project's plain-PyTorch ground truth.", ""]
    bw = result["copy_bandwidth_gbs"] is not None
    # Liger / CCE columns only when this run measured them (GPU, wheels installed)
    ext = [k for k in ("liger", "cce") if any(k in row["impls"] for row in result["results"])]
    head = ["op", "mode", "case", "impl", "ms", "x eager", "x compile", "x LCE"]
    head += [{"liger": "x Liger", "cce": "x CCE"}[k] for k in ext] + ["x floor", "% peak"]
    head += ["x bytes/copy-bw"] if bw else []
    head += ["MB", "mem x eager"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)
    for row in result["results"]:
        for name, r in row["impls"].items():
            q = row["ratios"][name]
            cells = [row["op"], row["mode"], row["label"], name, f(r["time_ms"], "{:.3g}"),
                     f(q.get("eager")), f(q.get("compile")), f(q.get("lce"))]
            cells += [f(q.get(k)) for k in ext]
            cells += [f(q.get("floor")),
                      f(None if q.get("peak") is None else 100 * q["peak"], "{:.0f}")]
            cells += [f(q.get("bandwidth"))] if bw else []
            mb = None if r["mem_bytes"] is None else r["mem_bytes"] / 2**20
            cells += [f(mb, "{:.1f}"), f(q.get("mem"))]
            lines.append("| " + " | ".join(cells) + " |")
        fl = (100 * row["gflop"] / (row["floor"]["time_ms"] / 1e3) / row["peak_gflops"]
              if row.get("gflop") and row.get("peak_gflops") else None)
        lines.append(f"| {row['op']} | {row['mode']} | {row['label']} | *floor* | "
                     f"{row['floor']['time_ms']:.3g} | | | |{' |' * len(ext)} "
                     f"{row['floor']['what']} | "
                     f"{f(fl, '{:.0f}')} |" + (" |" if bw else "") + " | |")
    lines += _options_table(result["results"])
    skipped = sorted({f"`{k}`: {v}" for row in result["results"]
                      for k, v in row["skipped"].items() if k in cases.KERNELS})
    failed = [f"{row['op']} {row['label']} `{k}`: {v}" for row in result["results"]
              for k, v in row["failed"].items()]
    if skipped:
        lines += ["", "Kernel backends not measured:", ""] + [f"- {s}" for s in skipped]
    if failed:
        lines += ["", "Failed:", ""] + [f"- {s}" for s in failed]
    return "\n".join(lines) + "\n"


def _options_table(results: list[dict]) -> list[str]:
    """Each option row against the plain row of the same case (same run): the kernel
    backends' time over their plain time, and each implementation's ratio to eager."""
    key = lambda r: json.dumps(dict(r["case"], option=""), sort_keys=True)  # noqa: E731
    plain = {key(r): r for r in results if not r["case"].get("option")}
    out = []
    for row in results:
        base = plain.get(key(row))
        if not row["case"].get("option") or base is None:
            continue
        for name in row["impls"]:
            if name not in cases.KERNELS or name not in base["impls"]:
                continue
            t, t0 = row["impls"][name]["time_ms"], base["impls"][name]["time_ms"]
            q = row["ratios"][name]
            out.append(f"| {row['op']} | {base['label']} | {row['case']['option']} | {name} | "
                       f"{t0:.3g} | {t:.3g} | {t / t0:.3f} | "
                       + " | ".join("-" if q.get(k) is None else f"{q[k]:.2f}"
                                    for k in ("eager", "compile")) + " |")
    if not out:
        return []
    return ["", "Options against the plain fused op (same run): `x plain` is the option's time "
            "over the plain call's; `x eager` / `x compile` against the idiomatic PyTorch "
            "with that option (`F.normalize` first for `normalize`).", "",
            "| op | case | option | impl | plain ms | option ms | x plain | x eager | "
            "x compile |", "|---|---|---|---|---|---|---|---|---|"] + out


def _sweeps(results: list[dict], var: str) -> list[tuple[str, list[dict]]]:
    """Groups of results that differ only in ``var`` ("n", or "c"), with >= 2 points.
    For pixel/pool, N varies through the image size, so ``b``/``hw`` are not keys."""
    groups: dict[str, list[dict]] = {}
    for row in results:
        c = dict(row["case"])
        c.pop(var)
        if var == "n":
            c.pop("b"), c.pop("hw")
        key = json.dumps(c, sort_keys=True)
        groups.setdefault(key, []).append(row)
    out = []
    for rows in groups.values():
        if len({r["case"][var] for r in rows}) >= 2:
            c = rows[0]["case"]
            fixed = f"C={c['c']}" if var == "n" else f"N={c['n']}"
            title = (f"{c['op']} {c['mode']} {c['dtype']} D={c['d']} {fixed}"
                     + (" grad2" if c["grad2"] and c["mode"] == "fwdbwd" else ""))
            out.append((title, sorted(rows, key=lambda r: r["case"][var])))
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(var, t, rows) for var in ("n", "c") for t, rows in _sweeps(result["results"], var)]
    fig, axes = plt.subplots(max(len(panels), 1), 2, figsize=(11, 3.2 * max(len(panels), 1)),
                             squeeze=False)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no sweeps in this preset", ha="center")
    for (var, title, rows), (ax_t, ax_m) in zip(panels, axes):
        xs = [r["case"][var] for r in rows]
        names = sorted({k for r in rows for k in r["impls"]}, key=cases.IMPLS.index)
        for name in names:
            pts = [(r["case"][var], r["impls"][name]) for r in rows if name in r["impls"]]
            ax_t.plot([p[0] for p in pts], [p[1]["time_ms"] for p in pts], "o-", label=name)
            mem = [(x, m["mem_bytes"] / 2**20) for x, m in pts if (m["mem_bytes"] or 0) > 0]
            if mem:
                ax_m.plot([p[0] for p in mem], [p[1] for p in mem], "o-", label=name)
        ax_t.plot(xs, [r["floor"]["time_ms"] for r in rows], "k--", label="floor")
        for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "peak extra memory (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("N (pixels)" if var == "n" else "C (classes)")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{result['preset']} on {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _NoBar:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, *args):
        pass

    def set_postfix_str(self, *args):
        pass


def device_slug(dev: torch.device) -> str:
    """``cpu``, or the GPU's name in lower case with dashes (``nvidia-h200``)."""
    if dev.type != "cuda":
        return dev.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()).strip("-")


def run(preset: str, out: Path, device: str = "auto", compile_: bool | None = None,
        budget_s: float | None = None, quiet: bool = False, memory: bool = True) -> dict:
    """Measure every case of ``preset`` and write the JSON/markdown/PNG; returns the JSON."""
    try:
        from tqdm import tqdm
    except ImportError:  # a bare GPU machine: progress bars are optional
        tqdm = _NoBar
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto"
                       else device)
    if preset in ("paper", "gpu-check") and dev.type != "cuda":
        raise SystemExit(f"the {preset} preset needs a CUDA device")
    threads = measure.cores()
    torch.set_num_threads(threads)
    if compile_ is None:
        compile_ = preset != "tiny"  # compiling every tiny case would take minutes on CPU
    if budget_s is None:
        budget_s = 0.2 if preset == "tiny" else 2.0
    impls = [i for i in cases.IMPLS if compile_ or i != "compile"]
    case_list = PRESETS[preset]()
    bw = measure.copy_bandwidth(dev) if dev.type == "cuda" else None
    peak_n = 256 if preset == "tiny" else 4096 if dev.type == "cuda" else 2048
    peaks = {dt: measure.gemm_peak(dev, cases.DTYPES[dt], n=peak_n, budget_s=budget_s) / 1e9
             for dt in sorted({c.dtype for c in case_list})}
    results = []
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{preset}-{device_slug(dev)}"
    result = {"schema": SCHEMA, "preset": preset, "device": dev.type, "stem": stem.name,
              "env": measure.environment(dev), "copy_bandwidth_gbs": bw and bw / 1e9,
              "gemm_peak_gflops": peaks, "gemm_peak_n": peak_n,
              "memory_method": ("cuda max_memory_allocated delta after a warm-up"
                                if dev.type == "cuda" else
                                "VmHWM growth over one call in a fresh subprocess, after a "
                                "warm-up call and a peak reset"),
              "complete": False, "results": results}
    with tqdm(total=len(case_list) * (len(impls) + 1), desc=f"{preset} on {dev.type}",
              disable=quiet, file=sys.stderr) as bar:
        for case in case_list:
            row = _measure_case(case, impls, dev, threads, budget_s, bar, memory)
            row["gflop"] = cases.gemm_flops(case) / 1e9
            row["peak_gflops"] = peaks[case.dtype]
            if bw is not None:
                row["bytes"] = cases.min_bytes(case)
                row["bw_time_ms"] = 1e3 * row["bytes"] / bw
            row["ratios"] = ratios(row)
            results.append(row)
            # after every case, so that a long run cut short still leaves its figures
            stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
            stem.with_suffix(".md").write_text(markdown(result))
    result["complete"] = True
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    try:
        plot(result, stem.with_suffix(".png"))
    except ImportError as exc:  # matplotlib absent: the JSON and table are the results
        print(f"no plot: {exc}", file=sys.stderr)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--compile", dest="compile_", action=argparse.BooleanOptionalAction,
                   default=None, help="time torch.compile of the reference (default: not "
                                      "for tiny)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed repeats per measurement (default 0.2 tiny, 2 else)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak extra memory (default yes)")
    a = p.parse_args(argv)
    result = run(a.preset, a.out, a.device, a.compile_, a.budget, memory=a.memory)
    stem = a.out / result["stem"]
    print(f"wrote {stem}.json, .md, .png")
    if any(not math.isfinite(v) for row in result["results"] for q in row["ratios"].values()
           for v in q.values()):
        raise SystemExit("some ratios are not finite")


if __name__ == "__main__":
    main()
