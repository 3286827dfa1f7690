"""Learning curves from motion-probe runs: test top-1 against optimiser steps, mean and spread over seeds.

Reads the ``--json`` files of ``motion_probe.py --curve-every N`` runs (any number: seeds, arms, tasks) and
draws one panel per (task, classes, temporal stem) with one line per arm: the mean over the runs of that arm, a band
from the lowest to the highest run, the order-blind ceiling and ceiling + 3 s.d. (the "learned frame
order beyond doubt" line), and chance.

    python benchmarks/plot_curves.py runs/probe_*.json --out docs/learning_curves.png
    python benchmarks/plot_curves.py runs/probe_*.json --split-by lr --table --no-figure
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from motion_probe import binomial_sd

from datamodules.synthetic import ORDER_BLIND_CEILING

ARM_NAMES = {
    "plain": "plain (order-blind)",
    "sifa": "SIFA (paper's block)",
    "sifa-corr": "SIFA + correlation branch",
    "fcf": "FCF",
}


def line_label(arm: str, args: dict, split_by: tuple[str, ...] = ()) -> str:
    """What a run's line is called: the arm as the probe built it, then the `split_by` arguments' values."""
    stem = int(args.get("stem_temporal", 1))
    if arm == "plain" and stem > 1:
        name = f"C2D (temporal stem {stem})"
    elif args.get("sifa_net") and arm in ("sifa", "sifa-corr"):
        name = "SIFA-Net" + (" + correlation branch" if arm == "sifa-corr" else "")
    else:
        name = ARM_NAMES.get(arm, arm)
    return ", ".join([name, *(f"{key} {args[key]}" for key in split_by)])


def panel_key(data: dict) -> tuple[str, int, int]:
    """Runs share a panel when task, classes and temporal stem agree (a stem that sees frame order is
    another comparison, not another line beside the per-frame arms)."""
    return data["task"], int(data["num_classes"]), int(data.get("args", {}).get("stem_temporal", 1))


def load_curves(
    paths: list[Path], split_by: tuple[str, ...] = (), arms: tuple[str, ...] | None = None
) -> dict[tuple[str, int, int], dict[str, list[list[dict]]]]:
    """{(task, K, temporal stem): {line label: [curve of one run, ...]}} from probe JSON files; runs without
    a curve are skipped. A line is an arm, or with `split_by` an arm and the values of those probe
    arguments (so runs of one arm at two learning rates are two lines, not one band). `arms`: only
    these probe arms (default: all)."""
    panels: dict[tuple[str, int, int], dict[str, list[list[dict]]]] = defaultdict(lambda: defaultdict(list))
    for path in paths:
        data = json.loads(path.read_text(encoding="utf-8"))
        for result in data["results"]:
            if result.get("curve") and (arms is None or result["arm"] in arms):
                label = line_label(result["arm"], data.get("args", {}), split_by)
                panels[panel_key(data)][label].append(result["curve"])
    return panels


def summarise(runs: list[list[dict]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps and the mean / min / max test top-1 over runs, at the steps every run measured."""
    common = sorted(set.intersection(*({p["step"] for p in run} for run in runs)))
    by_step = [[next(p["top1"] for p in run if p["step"] == s) for run in runs] for s in common]
    return common, [sum(v) / len(v) for v in by_step], [min(v) for v in by_step], [max(v) for v in by_step]


def panel_title(key: tuple[str, int, int]) -> str:
    task, k, stem = key
    return f"{task}, K = {k}" + (f", temporal stem {stem}" if stem > 1 else "")


def network_of(label: str) -> str:
    """The network part of a line label (before the --split-by settings)."""
    return label.partition(", ")[0]


def first_step_past(run: list[dict], level: float) -> int | None:
    """The first measured step at which a run's test top-1 exceeds `level` (None: never)."""
    return next((p["step"] for p in sorted(run, key=lambda p: p["step"]) if p["top1"] > level), None)


def table(panels, test_videos: int) -> str:
    """Markdown, a table per panel: each line's mean test top-1 (lowest-highest run) at every step all
    its runs measured, and each run's first step past ceiling + 3 s.d. (the learning-speed figure)."""
    level = ORDER_BLIND_CEILING + 3 * binomial_sd(ORDER_BLIND_CEILING, test_videos)
    out = []
    for key in sorted(panels):
        lines = sorted(panels[key].items())
        summaries = {label: summarise(runs) for label, runs in lines}
        steps = sorted({s for summary in summaries.values() for s in summary[0]})
        out.append(f"{panel_title(key)}: test top-1 %, mean (range)")
        out.append("")
        out.append(
            "| line | runs | " + " | ".join(f"step {s}" for s in steps) + f" | first step > {100 * level:.1f}% |"
        )
        out.append("| --- | --- |" + " --- |" * (len(steps) + 1))
        for label, runs in lines:
            at = {s: (m, lo, hi) for s, m, lo, hi in zip(*summaries[label], strict=True)}
            cells = [
                f"{100 * at[s][0]:.1f} ({100 * at[s][1]:.0f}-{100 * at[s][2]:.0f})" if s in at else "" for s in steps
            ]
            firsts = ", ".join(str(first_step_past(run, level) or "never") for run in runs)
            out.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + f" | {firsts} |")
        out.append("")
    return "\n".join(out)


# One colour per network across panels; the runs' other settings (--split-by) change the line style.
COLOURS = {
    "plain (order-blind)": "tab:grey",
    "C2D": "tab:grey",  # C2D (temporal stem N)
    "SIFA (paper's block)": "tab:orange",
    "SIFA-Net": "tab:orange",
    "SIFA-Net + correlation branch": "tab:red",
    "SIFA + correlation branch": "tab:red",
    "FCF": "tab:blue",
}
STYLES = ("-", "--", ":", "-.")


def line_style(label: str, seen: dict[str, list[str]]) -> tuple[str | None, str]:
    """(colour, line style) of a line: the colour of its network, a new style for each other setting."""
    name, rest = network_of(label), label.partition(", ")[2]
    colour = COLOURS.get(name, COLOURS.get(name.split(" ")[0]))
    variants = seen.setdefault(name, [])
    if rest not in variants:
        variants.append(rest)
    return colour, STYLES[variants.index(rest) % len(STYLES)]


def plot(panels, out: Path, test_videos: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(panels)
    cols = min(2, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys, strict=False):
        k = key[1]
        ceiling = ORDER_BLIND_CEILING
        sd = binomial_sd(ceiling, test_videos)
        seen: dict[str, list[str]] = {}
        one_network = len({network_of(label) for label in panels[key]}) == 1
        for arm, runs in sorted(panels[key].items()):
            steps, mean, low, high = summarise(runs)
            # one network in the panel: its settings get a colour each instead
            colour, style = (None, "-") if one_network else line_style(arm, seen)
            (line,) = ax.plot(
                steps, [100 * m for m in mean], marker="o", ms=3, ls=style, color=colour, label=f"{arm} ({len(runs)})"
            )
            ax.fill_between(steps, [100 * v for v in low], [100 * v for v in high], color=line.get_color(), alpha=0.15)
        ax.axhline(100 * ceiling, color="k", lw=1, ls="--", label="order-blind ceiling")
        ax.axhline(100 * (ceiling + 3 * sd), color="k", lw=1, ls=":", label=f"ceiling + 3 s.d. ({test_videos} videos)")
        if k > 2:
            ax.axhline(100 / k, color="grey", lw=1, ls="-.", label="chance")
        ax.set_title(panel_title(key))
        ax.set_xlabel("optimiser steps")
        ax.set_ylabel("test top-1 (%), mean and range of runs")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="motion_probe.py --json files")
    ap.add_argument("--out", type=Path, default=Path("docs/learning_curves.png"))
    ap.add_argument("--test-videos", type=int, default=128, help="test videos per run (for the 3 s.d. line)")
    ap.add_argument(
        "--split-by",
        nargs="+",
        default=[],
        help="probe arguments (as in the JSON's args, e.g. lr) that make separate lines",
    )
    ap.add_argument("--arms", nargs="+", default=None, help="only these probe arms (default: every arm in the files)")
    ap.add_argument("--table", action="store_true", help="also print the curves as markdown tables")
    ap.add_argument("--no-figure", action="store_true", help="draw nothing (with --table: the tables only)")
    args = ap.parse_args(argv)
    for name in args.split_by:
        missing = [str(p) for p in args.runs if name not in json.loads(p.read_text(encoding="utf-8"))["args"]]
        if missing:
            ap.error(f"--split-by {name}: no such probe argument in {', '.join(missing)}")
    panels = load_curves(args.runs, tuple(args.split_by), tuple(args.arms) if args.arms else None)
    if not panels:
        ap.error("no run in these files has a curve (run motion_probe.py with --curve-every N)")
    if args.table:
        print(table(panels, args.test_videos))
    if not args.no_figure:
        plot(panels, args.out, args.test_videos)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
