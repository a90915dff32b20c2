#!/usr/bin/env python
"""Compare text runs: one markdown table from their report JSONs.

    python scripts/compare_text.py runs/biva-lstm runs/rnn-vae runs/lstm-lm
    python scripts/compare_text.py RUN... --split valid --output table.md

Reads report-<split>.json of each run (written by scripts/report_text.py). Columns: the paper's
Table 7 (params, -log p(x) <= -L_1, KL, perplexity from L_1) and the importance-weighted figures
(-L_K, its perplexity), active units and mutual information; nats per sentence.
"""
from __future__ import annotations

from pathlib import Path

from shared.cli import ArgumentParser
from shared.errors import UserError, run_cli

COLUMNS = ("run", "model", "params", "-log p(x) ≤ (L_1)", "KL", "PPL (L_1)", "-log p(x) ≤ (L_K)", "K",
           "PPL (L_K)", "active units", "MI")


def parse_args(argv=None):
    import argparse

    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="text run directories with a report")
    p.add_argument("--split", choices=["test", "valid", "train"], default="test", help="which report (default test)")
    p.add_argument("--output", type=Path, help="also write the table to this markdown file")
    return p.parse_args(argv)


def _num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def row(name: str, r: dict) -> list[str]:
    exact = r.get("likelihood_exact", r.get("kl") is None)
    au = r.get("active_units")
    return [name, r.get("model", "?"), f"{r['num_params'] / 1e6:.2f}M",
            ("" if exact else "≤ ") + f"{r['nll_elbo']:.2f}", _num(r.get("kl"), ".2f"), f"{r['ppl_elbo']:.2f}",
            ("= " if exact else "≤ ") + f"{r['nll']:.2f}", _num(r.get("iw_samples"), "d"), f"{r['ppl']:.2f}",
            "–" if au is None else str(au["total"]), _num(r.get("mutual_info"), ".3f")]


def table(reports: list[tuple[str, dict]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(name, r)) + " |" for name, r in reports]
    return "\n".join(lines)


def main(argv=None) -> str:
    args = parse_args(argv)
    from shared.config import read_json

    reports = []
    for run in args.runs:
        path = run / f"report-{args.split}.json"
        if not path.is_file():
            raise UserError(f"{run} has no {path.name}; run scripts/report_text.py --run {run} --split {args.split} first")
        report = read_json(path, "report")
        missing = [k for k in ("num_params", "nll", "nll_elbo", "ppl", "ppl_elbo") if k not in report]
        if missing:
            raise UserError(f"{path} is not a text report (no {', '.join(missing)}); rerun scripts/report_text.py")
        reports.append((run.name, report))
    text = table(reports)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return text


if __name__ == "__main__":
    run_cli(main)
