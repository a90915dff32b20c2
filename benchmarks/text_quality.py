#!/usr/bin/env python
"""Table 7 on real sentences, on a CPU: do BIVA's latents carry the sentence next to an LSTM decoder?

    python benchmarks/text_quality.py                          # five models, the small preset, hours on 2 CPUs
    python benchmarks/text_quality.py --steps 300 --iw-samples 20 --out-dir /tmp/tq   # a quick look
    python benchmarks/text_quality.py --preset paper --models biva-lstm --minutes 7.5 --data data/austen \
        --iw-samples 100 --out-dir runs/gpu-tq --json $OUT/text_quality.json     # the GPU check: see below

The text is Jane Austen's six novels (31,438 sentences, the corpus bundled with the package,
biva_text/corpora/; --fetch or --root read Debian's r-cran-janeaustenr itself through
benchmarks/real_text.py, the same sentences), tokenised like BookCorpus and split 1000/1000 (seed 0,
benchmarks/real_text.py's split) for validation/test; the paper's filter (at most 40 pieces) and the word tokenizer (the default 20,000
pieces asked; the corpus supports fewer) apply as in any run. Every model is trained with
scripts/train_text.py --preset small (or the --preset given) and nothing else but the data and
--max-steps: the preset's own schedule (free bits on plateau for BIVA, KL warm-up for the RNN-VAE and
the Hybrid VAE), batch, learning rate and evaluation grid, the same number of optimiser steps for
all. Each is then reported with scripts/report_text.py on the test split.

Printed: a Table-7-shaped table (parameters, -log p(x) from L_1 and L_K, KL, perplexity from L_1,
active units, the reconstruction gain log p(x | z ~ q) - log p(x | z ~ p) and the unigram overlap of
greedy reconstructions with their input against other test sentences), then the latent-use checks of
biva-lstm: KL >= 5 nats, active units >= 10%, L_1 perplexity within 10% of lstm-lm's, KL above
rnn-vae's and hybrid-vae's, reconstructions sharing >= 2x as many words with their input as with
other sentences. Exit status 1 when a check fails. Runs, data, OUT_DIR/text_quality.json and a plot
beside it (text_quality.png: KL against greedy overlap and against perplexity, with the checks' lines)
go to --out-dir; a finished run (and its test report, when made at the same step and K) is reused unless
--retrain.

--minutes M trains every model for M minutes of wall-clock time (train_text.py --max-minutes) instead
of a number of steps (--steps, if given, still caps them); the models then get the same time, not the
same steps, and the figures depend on the machine. --preset paper with --minutes is the prepared GPU
check, the paper-sized biva-lstm on real sentences for a fixed time: --data points at the splits
(train.txt, valid.txt, test.txt) this script wrote before (OUT_DIR/data), since a lent GPU machine
reaches no package registry. On Jane Austen's few training sentences the paper's model sees many epochs
in minutes: expect it to overfit (figures: docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from shared.cli import ArgumentParser, positive_float, positive_int
from shared.errors import UserError, run_cli

MODELS = ("lstm-lm", "rnn-vae", "hybrid-vae", "biva-lstm", "biva")
UNBOUNDED_STEPS = 10**9  # with --minutes and no --steps: the time decides


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("runs/text-quality"), help="runs, data and results (default runs/text-quality)")
    p.add_argument("--preset", choices=("small", "paper", "quick", "tiny"), default="small",
                   help="the text preset every model is trained with (default small, the CPU benchmark)")
    p.add_argument("--steps", type=positive_int, help="optimiser steps of every model (default: the preset's max_steps)")
    p.add_argument("--minutes", type=positive_float,
                   help="train every model for this many minutes instead (a cap on steps only with --steps)")
    p.add_argument("--data", type=Path,
                   help="a folder with train.txt, valid.txt and test.txt to use instead of Jane Austen's novels")
    p.add_argument("--device", default="auto", help="device of the test reports: auto, cpu, cuda (default auto)")
    p.add_argument("--iw-samples", type=positive_int, default=200, help="K of the test L_K (default 200)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which models (default all five)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--root", type=Path, help="directory r-cran-janeaustenr was unpacked into")
    p.add_argument("--fetch", action="store_true", help="read the novels from Debian's r-cran-janeaustenr (apt-get "
                                                        "download and unpack it if missing) instead of the bundled "
                                                        "corpus")
    p.add_argument("--json", type=Path, help="summary JSON (default OUT_DIR/text_quality.json)")
    p.add_argument("--retrain", action="store_true", help="train again even where a finished run exists")
    p.add_argument("--extra", action="append", default=[], metavar="NAME:MODEL:FLAGS",
                   help="an extra run beside the table's, e.g. 'scaled:biva-lstm:--decoder-input scaled' "
                        "(repeatable; reported, not checked)")
    return p.parse_args(argv)


def load_script(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare_data(args) -> Path:
    """The splits: --data, or Jane Austen's sentences split 1000/1000 (seed 0) into OUT_DIR/data, from the
    corpus bundled with the package (the same sentences) unless --root/--fetch ask for the Debian package."""
    if args.data is not None:
        missing = [s for s in ("train", "valid", "test") if not (args.data / f"{s}.txt").is_file()]
        if missing:
            raise UserError(f"--data {args.data} lacks {', '.join(s + '.txt' for s in missing)}")
        return args.data
    data = args.out_dir / "data"
    if all((data / f"{s}.txt").is_file() for s in ("train", "valid", "test")):
        return data
    import real_text  # a sibling: run as a script, benchmarks/ is on sys.path

    if args.fetch or args.root is not None:
        try:
            real_text.find_data(args.root)
        except UserError:
            if not args.fetch:
                raise
            real_text.fetch()
        sentences = real_text.load_sentences(args.root)
    else:
        sentences = real_text.bundled_sentences()
    counts = real_text.write_splits(data, sentences, 1000, 1000, 0)
    print(f"{len(sentences)} Jane Austen sentences -> {data}: {counts}", file=sys.stderr)
    return data


def finished(run: Path, steps: int | None, minutes: float | None) -> int | None:
    """The step a finished run ended at (its steps done, or its minutes used up), else None."""
    from shared.checkpoints import latest_checkpoint

    latest = latest_checkpoint(run) if (run / "config.json").is_file() else None
    if latest is None:
        return None
    step, path = latest
    if steps is not None and step >= steps:
        return step
    trained = json.loads((path / "trainer_state.json").read_text()).get("train_seconds", 0)
    if minutes is not None and trained >= 60 * minutes:
        return step
    return None


def cached_report(run: Path, steps: int, iw_samples: int) -> dict | None:
    """The run's test report when it was made at ``steps`` with this K and holds every figure used here."""
    path = run / "report-test.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    fresh = report.get("step") == steps and report.get("iw_samples") in (iw_samples, None) and "unigram_overlap" in report
    return report if fresh else None


def checks(reports: dict) -> list[tuple[str, bool, str]]:
    """The text table's checks on biva-lstm, as (what, passed, figures)."""
    b = reports.get("biva-lstm")
    if b is None:
        return []
    au, u = b["active_units"], b["unigram_overlap"]
    m = b.get("unigram_overlap_mean")  # reports made before it have no posterior-mean figure
    mean = "" if m is None else f"; from the posterior means {m['ratio'] or 0:.2f}x"
    out = [("biva-lstm KL >= 5 nats", b["kl"] >= 5.0, f"{b['kl']:.2f}"),
           ("biva-lstm active units >= 10%", au["total"] >= 0.1 * au["units"],
            f"{au['total']} of {au['units']} ({au['total'] / au['units']:.1%})"),
           ("reconstructions share >= 2x the words with their input", (u["ratio"] or 0) >= 2.0,
            f"{u['own']:.1%} own vs {u['other']:.1%} other ({u['ratio'] or 0:.2f}x{mean})")]
    if "lstm-lm" in reports:
        lm = reports["lstm-lm"]["ppl_elbo"]
        out.append(("biva-lstm L_1 perplexity within 10% of lstm-lm's", b["ppl_elbo"] <= 1.1 * lm,
                    f"{b['ppl_elbo']:.2f} vs {lm:.2f} ({b['ppl_elbo'] / lm - 1:+.1%})"))
    for other in ("rnn-vae", "hybrid-vae"):
        if other in reports:
            out.append((f"biva-lstm KL above {other}'s", b["kl"] > reports[other]["kl"],
                        f"{b['kl']:.2f} vs {reports[other]['kl']:.2f}"))
    return out


def plot_trade_off(reports: dict, path: Path, title: str) -> bool:
    """KL against the greedy-overlap ratio and against L_1 perplexity, one point per run with latents
    (orange: the table's models, blue: --extra runs), with the checks' lines (2x overlap; lstm-lm's
    perplexity and +10 %, when lstm-lm is in the table), as PNG. False, and nothing written, when no
    run has latents."""
    points = {n: r for n, r in reports.items() if r["kl"] is not None and r["unigram_overlap"] is not None}
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    for name, r in points.items():
        color = "tab:orange" if name in MODELS else "tab:blue"  # the table's runs, the --extra ones
        for ax, y in ((left, r["unigram_overlap"]["ratio"] or 0.0), (right, r["ppl_elbo"])):
            ax.scatter(r["kl"], y, color=color)
            ax.annotate(name, (r["kl"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    left.axhline(2.0, color="tab:red", linestyle="--", label="check: 2x")
    left.set_ylim(bottom=min(1.0, left.get_ylim()[0]), top=max(2.2, left.get_ylim()[1]))
    left.set_xlabel("KL (nats per sentence)")
    left.set_ylabel("greedy overlap, own / other sentences")
    if "lstm-lm" in reports:
        lm = reports["lstm-lm"]["ppl_elbo"]
        right.axhline(lm, color="tab:gray", label=f"lstm-lm {lm:.1f}")
        right.axhline(1.1 * lm, color="tab:red", linestyle="--", label="check: lstm-lm +10 %")
    right.set_xlabel("KL (nats per sentence)")
    right.set_ylabel("perplexity (L_1)")
    for ax in (left, right):
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def row(name: str, r: dict) -> str:
    au, u = r["active_units"], r["unigram_overlap"]
    kl = "–" if r["kl"] is None else f"{r['kl']:.2f}"
    units = "–" if au is None else f"{au['total']}/{au['units']}"
    gain = "–" if r["reconstruction_gain"] is None else f"{r['reconstruction_gain']:.2f}"
    overlap = "–" if u is None else f"{u['own']:.1%} / {u['other']:.1%}"
    tf = (r.get("teacher_forced_accuracy") or {}).get("posterior")  # z ~ q; the LM's own figure without z
    accuracy = "–" if tf is None else f"{tf['all']:.1%} / {tf['rare']:.1%}"
    return (f"| {name} | {r['num_params'] / 1e6:.2f}M | {r['nll_elbo']:.2f} | {r['nll']:.2f} | {kl} | "
            f"{r['ppl_elbo']:.2f} | {units} | {gain} | {overlap} | {accuracy} |")


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from biva_text.presets import get_preset
    from shared.checkpoints import latest_checkpoint
    from shared.metrics_log import read_metrics

    torch.set_num_threads(args.threads)
    steps = args.steps or (None if args.minutes else get_preset(args.preset).train.max_steps)
    budget = ["--max-steps", str(steps or UNBOUNDED_STEPS)]
    if args.minutes:
        budget += ["--max-minutes", str(args.minutes)]
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args)
    train_text, report_text = load_script("train_text"), load_script("report_text")
    runs = [(m, m, []) for m in args.models]
    for spec in args.extra:
        try:
            name, model, flags = spec.split(":", 2)
        except ValueError:
            raise UserError(f"--extra {spec!r}: expected NAME:MODEL:FLAGS") from None
        runs.append((name, model, flags.split()))
    reports, seconds = {}, {}
    for name, model, flags in runs:
        run = args.out_dir / name
        if args.retrain and run.exists():
            import shutil

            shutil.rmtree(run)
        common = ["--preset", args.preset, "--model", model, "--train-files", str(data / "train.txt"),
                  "--valid-files", str(data / "valid.txt"), "--test-files", str(data / "test.txt"),
                  *budget, "--output-dir", str(run), "--cache-dir", str(args.out_dir / "cache")]
        start = time.time()
        end = finished(run, steps, args.minutes)
        if end is None:
            limits = [f"{steps} steps" if steps else "", f"{args.minutes:g} minutes" if args.minutes else ""]
            print(f"training {name} ({model}) for {' and at most '.join(filter(None, limits))} -> {run}",
                  file=sys.stderr)
            resume = ["--resume"] if (run / "config.json").is_file() else []
            train_text.main(common + flags + resume)
            end = latest_checkpoint(run)[0]  # the last step is always checkpointed
        seconds[name] = time.time() - start
        reports[name] = cached_report(run, end, args.iw_samples) or report_text.main(
            ["--run", str(run), "--iw-samples", str(args.iw_samples), "--device", device])

    corpus = "Jane Austen" if args.data is None else str(args.data)
    each = (f"{steps} steps each" if not args.minutes
            else f"{args.minutes:g} minutes each" + (f" (at most {steps} steps)" if steps else ""))
    print(f"\nTable 7 shape, {corpus} test split, preset {args.preset}, {each} "
          f"(-log p(x) in nats per sentence; AU: active units / units; overlap: own / other sentences; "
          f"next word: teacher-forced accuracy with z ~ q, all words / outside the 50 most frequent)")
    print("| model | params | -log p(x) ≤ -L_1 | ≤ -L_K | KL | PPL (L_1) | AU | rec. gain | overlap | next word |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in reports.items():
        print(row(name, r))
    results = checks(reports)
    for what, ok, figures in results:
        print(f"{'PASS' if ok else 'FAIL'}  {what}: {figures}")
    schedules = {}
    for name in reports:
        events = [{"step": r["step"], "budget": r["budget"]} for r in read_metrics(args.out_dir / name)
                  if r.get("event") == "free_bits"]
        if events:
            schedules[name] = events
            print(f"{name}: free-bits budget changes: " + ", ".join(f"step {e['step']}: {e['budget']:g}" for e in events))
    summary = {"settings": {"steps": steps, "minutes": args.minutes, "preset": args.preset, "data": corpus,
                            "iw_samples": args.iw_samples, "threads": args.threads, "device": device,
                            "extra": args.extra},
               "reports": reports, "train_seconds": seconds, "free_bits_changes": schedules,
               "checks": [{"what": w, "passed": ok, "figures": f} for w, ok, f in results]}
    out = args.json or args.out_dir / "text_quality.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out}")
    figure = out.with_suffix(".png")
    if plot_trade_off(reports, figure, f"{corpus} test split, preset {args.preset}, {each}"):
        print(f"wrote {figure} (KL against greedy overlap and perplexity, with the checks' lines)")
    if not all(ok for _, ok, _ in results):
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    run_cli(main)
