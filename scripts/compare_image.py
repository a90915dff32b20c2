#!/usr/bin/env python
"""Compare image runs: the ablation table (the paper's Table 1) and their KL per level in one plot
(the paper's Figure 5), from each run's report JSON.

    python scripts/report_image.py --run runs/lvae --split test       # once per run
    python scripts/compare_image.py runs/lvae runs/lvae+ runs/biva --out table.md --plot kl.png

Each row: model, depth L, parameters, bits/dim of the ELBO and of L_K (K importance samples, as the
report used), and active groups (groups with at least one active unit) out of all groups.
Reads RUN/report-<split>.json; needs no GPU and no data.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from shared.cli import ArgumentParser
from shared.errors import run_cli


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run directories with a report JSON")
    p.add_argument("--split", choices=["train", "valid", "test"], default="test",
                   help="which report to read, report-<split>.json (default test)")
    p.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    p.add_argument("--plot", type=Path, help="PNG of the KL per level of every run (default: none)")
    args = p.parse_args(argv)
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        p.error(f"--plot {args.plot} must end in .png")
    return args


def run_names(runs: list[Path]) -> list[str]:
    """Short unique names: the folder name, or the full path where two folders share a name."""
    names = [r.name or str(r) for r in runs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, runs)]


def main(argv=None) -> str:
    args = parse_args(argv)
    from biva_image.report import compare_table, read_report

    reports = [read_report(r, args.split) for r in args.runs]  # every run checked before anything is written
    rows = list(zip(run_names(args.runs), reports))
    table = compare_table(rows)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(table + "\n")
        tmp.replace(args.out)
        print(f"wrote {args.out}")
    if args.plot is not None:
        from biva_image.plots import plot_kl_comparison

        plot_kl_comparison([(name, r["kl_per_group"]) for name, r in rows], args.plot)
        print(f"wrote {args.plot}")
    return table


if __name__ == "__main__":
    run_cli(main)
