#!/usr/bin/env python
"""The speed issue's GPU check in one run: every figure it asks for, against its targets, within a
wall-clock budget (one prepared command for a lent GPU; run it once, well inside 10 minutes).

    python benchmarks/gpu_speed.py                                   # on a GPU: ~6 minutes
    python benchmarks/gpu_speed.py --out $OUT                        # also writes gpu_speed.json there
    python benchmarks/gpu_speed.py --device cpu --quick              # the same pipeline on a CPU, tiny shapes

Entries (each a separate process, in this order, skipped once --budget-s is spent):
  1. CIFAR-10 preset, bf16, batch 48: training images/s and peak memory; L_1000 on 8 images (images/s)
  2. CIFAR-10 preset, fp32, batch 48: training images/s (bf16 must beat it)
  3. CIFAR-10 preset, bf16, batch 256: training images/s and peak memory
  4. paper-sized biva-lstm, bf16, batch 512, length-bucketed batches: training tokens/s, peak memory
  5. benchmarks/profile_step.py --what image --preset cifar10 --mixed-precision bf16: kernel launches
     per step and the GPU's idle time between kernels (the launch-bound diagnosis)
  6. CIFAR-10 preset, bf16, batch 48, --compile: compile time (first step) and training images/s; L_1000
     on 8 images through the compiled forward (report_image.py --compile), its compile time apart
Targets (the issue's): >= 1,500 images/s at batch 48, >= 4,000 at batch 256, L_1000 >= 30 images/s,
biva-lstm >= 500k tokens/s, bf16 faster than fp32. The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.cli import ArgumentParser, positive_int  # noqa: E402
from shared.errors import run_cli  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGETS = {"cifar10 bf16 b48": ("train_images_per_s", 1500), "cifar10 bf16 b256": ("train_images_per_s", 4000),
           "L_1000": ("eval_images_per_s", 30), "biva-lstm bf16 b512": ("train_tokens_per_s", 500_000)}


def entries(args) -> list[tuple[str, list[str]]]:
    py, dev = sys.executable, ["--device", args.device]
    image = [py, str(HERE / "image_throughput.py"), *dev, "--preset", "tiny" if args.quick else "cifar10"]
    steps = ["--steps", "2" if args.quick else "30", "--warmup", "1" if args.quick else "5"]
    k = "20" if args.quick else "1000"
    text = [py, str(HERE / "text_throughput.py"), *dev, "--mixed-precision", "bf16", "--length-buckets",
            *steps, "--iw-samples", "1", "--iw-sentences", "1", "--iw-batch", "1", "--tok-sentences", "10"]
    if args.quick:
        text += ["--preset", "tiny", "--vocab-size", "200"]
    small, large, text_batch = (8, 16, 8) if args.quick else (48, 256, 512)
    return [
        ("cifar10 bf16 b48", image + ["--mixed-precision", "bf16", "--batch-size", str(small), *steps,
                                      "--iw-samples", k, "--eval-batch-size", "2" if args.quick else "8"]),
        ("cifar10 fp32 b48", image + ["--batch-size", str(small), *steps, "--iw-samples", "0"]),
        ("cifar10 bf16 b256", image + ["--mixed-precision", "bf16", "--batch-size", str(large), *steps,
                                       "--iw-samples", "0"]),
        ("biva-lstm bf16 b512", text + ["--batch-size", str(text_batch)]),
        ("profile", [py, str(HERE / "profile_step.py"), *dev, "--what", "image", "--preset",
                     "tiny" if args.quick else "cifar10", "--mixed-precision", "bf16", "--steps", "3",
                     "--warmup", "2", "--rows", "10"]),
        ("cifar10 bf16 b48 compiled", image + ["--mixed-precision", "bf16", "--batch-size", str(small), *steps,
                                               "--iw-samples", k, "--eval-batch-size", "2" if args.quick else "8",
                                               "--compile"]),
    ]


def run_entry(name: str, command: list[str], timeout: float) -> dict:
    start = time.perf_counter()
    try:
        p = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"timed out after {timeout:.0f} s"}
    result = {"name": name, "wall_s": round(time.perf_counter() - start, 1)}
    if p.returncode != 0:
        return {**result, "error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    if name == "profile":
        return {**result, "report": p.stdout + p.stderr}
    return {**result, **json.loads(p.stdout.strip().splitlines()[-1])}


def summary(results: list[dict]) -> list[str]:
    by = {r["name"]: r for r in results}
    lines = ["| check | figure | target | |", "|---|---|---|---|"]

    def row(check, name, key, target, unit):
        r = by.get(name, {})
        value = r.get(key)
        if value is None:
            lines.append(f"| {check} | {r.get('error', 'not run')} | {target} | – |")
        else:
            ok = "" if target is None else ("PASS" if value >= target[0] else "FAIL")
            peak = r.get("train_peak_memory_gib")
            mem = f", peak {peak:.2f} GiB" if peak is not None and key.startswith("train") else ""
            lines.append(f"| {check} | {value:,.1f} {unit}{mem} | {target[1] if target else ''} | {ok} |")

    row("CIFAR-10 bf16, batch 48", "cifar10 bf16 b48", "train_images_per_s", (1500, ">= 1,500"), "images/s")
    row("CIFAR-10 fp32, batch 48", "cifar10 fp32 b48", "train_images_per_s", None, "images/s")
    row("CIFAR-10 bf16, batch 256", "cifar10 bf16 b256", "train_images_per_s", (4000, ">= 4,000"), "images/s")
    row("L_1000 evaluation (bf16)", "cifar10 bf16 b48", "eval_images_per_s", (30, ">= 30"), "images/s")
    row("biva-lstm bf16, batch 512", "biva-lstm bf16 b512", "train_tokens_per_s", (500_000, ">= 500k"), "tokens/s")
    row("CIFAR-10 bf16, batch 48, --compile", "cifar10 bf16 b48 compiled", "train_images_per_s", None, "images/s")
    row("L_1000 evaluation (bf16, --compile)", "cifar10 bf16 b48 compiled", "eval_images_per_s", (30, ">= 30"),
        "images/s")
    bf16, fp32 = by.get("cifar10 bf16 b48", {}), by.get("cifar10 fp32 b48", {})
    if "train_images_per_s" in bf16 and "train_images_per_s" in fp32:
        ratio = bf16["train_images_per_s"] / fp32["train_images_per_s"]
        lines.append(f"| bf16 / fp32 at batch 48 | {ratio:.2f}x | > 1 | {'PASS' if ratio > 1 else 'FAIL'} |")
    compiled = by.get("cifar10 bf16 b48 compiled", {})
    if compiled.get("first_step_s") is not None:
        lines.append(f"| --compile: first step, compilation included | {compiled['first_step_s']:.1f} s | | |")
    if compiled.get("eval_warmup_s") is not None:
        lines.append(f"| --compile: L_K's first chunk, compilation included | {compiled['eval_warmup_s']:.1f} s | | |")
    return lines


def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="default cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes and 2 steps (a check of the pipeline, no figures)")
    p.add_argument("--no-compile", action="store_true", help="skip entry 6 (--compile)")
    p.add_argument("--budget-s", type=positive_int, default=480,
                   help="wall-clock seconds for all entries; later ones are skipped once it is spent (default 480)")
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                   help="folder for gpu_speed.json and profile.txt (default: $OUT when set)")
    args = p.parse_args(argv)
    deadline = time.perf_counter() + args.budget_s
    results = []
    todo = [(n, c) for n, c in entries(args) if not (args.no_compile and n.endswith("compiled"))]
    for name, command in todo:
        left = deadline - time.perf_counter()
        if left < 20:
            results.append({"name": name, "error": "skipped: --budget-s spent"})
            continue
        result = run_entry(name, command, left)
        results.append(result)
        print(f"{name}: {result.get('error') or 'done'} ({result.get('wall_s', '?')} s)", file=sys.stderr, flush=True)
    profile = next((r.get("report") for r in results if r["name"] == "profile"), None)
    if args.quick:
        print("--quick: tiny shapes, a check of the pipeline; not the issue's figures")
    print("\n".join(summary(results)))
    if profile:
        print(profile[-6000:])
    out = {"benchmark": "gpu_speed", "device": args.device, "quick": args.quick,
           "results": [{k: v for k, v in r.items() if k != "report"} for r in results]}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_speed.json").write_text(json.dumps(out, indent=2))
        if profile:
            (args.out / "profile.txt").write_text(profile)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    run_cli(main)
