#!/usr/bin/env python
"""The GPU check in one prepared run: every speed figure, against its target, each written to disk the
moment it is measured, so a GPU slot cut short still brings back what it measured. (Over 500 lines: the
runner, its child wrapper and the entry plan belong together, so that one file is the whole check.)

    python benchmarks/gpu_speed.py --out DIR                 # one H100: within 8 minutes (--budget-s 480)
    python benchmarks/gpu_speed.py --out DIR --quick         # the 5 most important entries, fewer steps: 3 minutes
    python benchmarks/gpu_speed.py --out DIR --device cpu --quick   # the same pipeline on a CPU, tiny shapes
    python benchmarks/gpu_speed.py --list                    # the plan: entries, timeouts, commands
    python benchmarks/gpu_speed.py --out DIR --entries cifar10-bf16-b48-compiled --entry-timeout-s 560

Entries, in order of importance; each runs as its own subprocess with its own timeout:
  1. cifar10-bf16-b48          training images/s, CIFAR-10 preset, bf16, batch 48      target >= 1,500
  2. cifar10-fp32-b48          the same in fp32 (TF32 matmuls)                         bf16 / fp32 > 1
  3. cifar10-bf16-b256         training images/s at batch 256                          target >= 4,000
  4. cifar10-L1000             L_1000 evaluation images/s, 8 images, bf16              target >= 30
  5. text-biva-lstm-b512       paper biva-lstm, bf16, batch 512, length buckets: tokens/s   >= 500k
  6. cifar10-bf16-b48-compiled --compile: compile time (first step), training images/s (>= 1,500) and
                               L_1000 through the compiled forward (>= 30)
  7. profile-cifar10-bf16      benchmarks/profile_step.py: kernel launches per step, GPU busy and idle
                               time between kernels (the launch-bound diagnosis); no target
Entries 1-6 run benchmarks/image_throughput.py or benchmarks/text_throughput.py (their measuring code,
unchanged) and 7 benchmarks/profile_step.py, each under this file's ``--child`` wrapper, which dumps
every thread's stack on SIGUSR1 (sent at a timeout, so a partial log says where it was), and prints
at exit the process's peak GPU memory (torch.cuda.max_memory_allocated) and, when anything compiled,
torch._dynamo's compile-time table.

On disk, under --out DIR, each as soon as it is known:
  DIR/entries/NAME.json  the entry: status (ok, failed, timeout, skipped), its figures (the child's JSON,
                         parsed guardedly: a child printing no JSON object is a failed entry), targets and
                         verdicts, peak GPU memory, wall time; ``error`` holds a failed entry's whole traceback
  DIR/logs/NAME.log      the child's whole stdout and stderr, interleaved; partial for a timed-out entry
  DIR/summary.json       every entry (pending ones too) and every verdict, rewritten after each entry
  DIR/table.md           the same as a table, rewritten after each entry
A timed-out entry keeps the figures its log had printed by then (``partial``: e.g. the compiled entry's
training line when its L_1000 was still compiling; ``partial_seen_s``: when that line came, an upper
bound on the training compile). The runner exits 0 whatever its entries did; the last line of stdout
is one JSON object (statuses and verdicts).

Time budget (one H100, 8 minutes = 480 s; the timeouts below sum to 480, so the run cannot exceed it
by more than the runner's own few seconds). ESTIMATES, not measurements on a GPU:
  * process start (torch, CUDA context, model build) ~5-10 s per entry; cuDNN's autotuning of the
    preset's ~300 convolutions (cudnn.benchmark) a few seconds in the first step;
  * eager entries: 35 steps of batch 48 take 1-6 s (1,500 images/s is 32 ms a step; a launch-bound
    step of ~6,600 launches at ~10 us each is ~70 ms), batch 256 under 10 s; L_1000 on 8 images is
    8,000 forward passes in chunks, seconds; the text step ~1 s for 35 steps at 500k tokens/s (512
    sentences of ~22 tokens a step), plus a few seconds of SentencePiece training in its tokeniser part.
    Timeouts 45-60 s each leave 5-10x headroom.
  * the compile (entry 6), estimated by scaling CPU compile times measured here (this machine: 2
    shared cores, torch 2.13, inductor cache cold; this very entry with --device cpu): the tiny image
    preset, whose step dispatches ~1,400 operators (benchmarks/op_counts.py), took 110 s for its first
    (compiling) bf16 step: forward graph 43 s, backward 44 s, optimiser step 11 s; about half of each
    is inductor's Python (lowering, scheduling, code generation), half the C++ build, dynamo's and
    AOTAutograd's tracing a few seconds. Its compiled L_K forward took 112 s more (eval warm-up: the
    new batch shape recompiles with dynamic shapes, 72 s of it code generation). The CIFAR-10 step
    dispatches ~10,700 operators (7.5x; its forward 8.4x) over 888 parameter tensors (9x). Scaled
    linearly, the Python parts alone (tiny: ~25 s for the training graphs, 5 s for the optimiser's,
    ~5 s tracing, 72 s for the evaluation forward) would be ~4.5 min for training and ~10 min for the
    evaluation forward on this CPU; the H100's host has faster cores (we assume 1.5x) and builds
    Triton kernels with 16 workers instead of one C++ build per graph. Our estimate on the H100:
    ~4-5 min to the first compiled training step, ~6-8 min more for the compiled L_1000. So entry 6
    most likely does NOT finish inside the 180 s it gets in the full run: it runs after every other
    figure but the profile, and at its timeout its log gets every thread's stack (where it was); give
    it a slot of its own (last command above, 560 s): the training figure, printed before L_K starts,
    is kept from the partial log (with the time it came: an upper bound on the compile).
  * the profile (entry 7): 5 eager steps, profiler post-processing of ~3 x 7,000 kernel events, ~20-30 s.
--quick: entries 1-5 only, 10 timed steps after 3 warm-up ones, timeouts summing to 180 s.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD_MARK = "GPU_SPEED_CHILD "  # the --child wrapper's own line at exit (not the child's JSON)
FULL_BUDGET_S, QUICK_BUDGET_S = 480, 180
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")


# ---------------------------------------------------------------------------------------------- entries
@dataclasses.dataclass
class Target:
    """A figure's target: ``figures[key] >= threshold`` (``strict``: >); with ``ratio_of`` (another
    entry's name) the value judged is that entry's figure over this one's."""

    key: str
    threshold: float
    label: str
    strict: bool = False
    ratio_of: str | None = None


@dataclasses.dataclass
class Entry:
    """One measurement: a command whose last JSON-object line of output holds its figures (``parse``
    "json") or whose output holds a profile_step report ("profile")."""

    name: str
    command: list[str]
    timeout_s: float
    what: str = ""  # one line: what it measures
    figure: str | None = None  # the key shown in the table
    unit: str = ""
    targets: list[Target] = dataclasses.field(default_factory=list)
    parse: str = "json"
    peak_keys: dict[str, float] = dataclasses.field(default_factory=dict)  # child key -> GiB per unit
    partial: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> regex over a timed-out log
    judged: bool = True  # False: tiny CPU shapes, targets shown but not judged
    env: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> Entry:
        d = dict(d)
        d["targets"] = [Target(**t) for t in d.get("targets", [])]
        return cls(**d)


IMAGE_PEAKS = {"train_peak_memory_gib": 1.0, "eval_peak_memory_gib": 1.0}
TEXT_PEAKS = {"peak_memory_mb": 1 / 1024}
TRAIN_LINE = {"train_images_per_s": r"training ([0-9.]+) images/s", "train_step_ms": r"\(([0-9.]+) ms per step"}


def builtin_entries(device: str = "cuda", quick: bool = False, compile_entries: bool = True) -> list[Entry]:
    """The check's entries in order of importance. On a CPU: the same commands on tiny shapes (the
    pipeline, not the figures: targets are not judged)."""
    gpu = device == "cuda"
    child = [sys.executable, str(Path(__file__).resolve()), "--child"]
    image = [*child, str(HERE / "image_throughput.py"), "--device", device, "--preset", "cifar10" if gpu else "tiny"]
    text = [*child, str(HERE / "text_throughput.py"), "--device", device]
    steps = (["--steps", "10", "--warmup", "3"] if quick else ["--steps", "30", "--warmup", "5"]) if gpu \
        else ["--steps", "2", "--warmup", "1"]
    small, large, text_batch = (48, 256, 512) if gpu else (8, 16, 8)
    k, k_images = ("1000", "8") if gpu else ("20", "2")
    image_peaks, text_peaks = (IMAGE_PEAKS, TEXT_PEAKS) if gpu else ({}, {})
    text_size = [] if gpu else ["--preset", "tiny", "--vocab-size", "200"]
    cpu_note = "" if gpu else " [CPU: tiny shapes]"
    # timeouts: full run / --quick (GPU); a CPU run gets the full ones (tiny shapes, well inside them)
    t = (lambda full, fast: fast if quick and gpu else full)
    entries = [
        Entry("cifar10-bf16-b48", image + ["--mixed-precision", "bf16", "--batch-size", str(small), *steps,
                                           "--iw-samples", "0"], t(45, 35),
              "training images/s, CIFAR-10 preset, bf16 autocast, batch 48 (eager)", "train_images_per_s",
              "images/s", [Target("train_images_per_s", 1500, ">= 1,500 images/s")], peak_keys=image_peaks,
              judged=gpu),
        Entry("cifar10-fp32-b48", image + ["--batch-size", str(small), *steps, "--iw-samples", "0"], t(45, 30),
              "training images/s, CIFAR-10 preset, fp32 (TF32 matmuls), batch 48", "train_images_per_s", "images/s",
              [Target("train_images_per_s", 1.0, "bf16 / fp32 > 1 (bf16 faster)", strict=True,
                      ratio_of="cifar10-bf16-b48")], peak_keys=image_peaks, judged=gpu),
        Entry("cifar10-bf16-b256", image + ["--mixed-precision", "bf16", "--batch-size", str(large), *steps,
                                            "--iw-samples", "0"], t(60, 40),
              "training images/s, CIFAR-10 preset, bf16, batch 256", "train_images_per_s", "images/s",
              [Target("train_images_per_s", 4000, ">= 4,000 images/s")], peak_keys=image_peaks, judged=gpu),
        Entry("cifar10-L1000", image + ["--mixed-precision", "bf16", "--batch-size", k_images, "--steps", "1",
                                        "--warmup", "0", "--iw-samples", k, "--eval-batch-size", k_images],
              t(45, 35), f"L_{k} evaluation images/s on {k_images} images, bf16 (one training step first)",
              "eval_images_per_s", "images/s", [Target("eval_images_per_s", 30, ">= 30 images/s")],
              peak_keys={"eval_peak_memory_gib": 1.0} if gpu else {}, judged=gpu),
        Entry("text-biva-lstm-b512", text + [*text_size, "--mixed-precision", "bf16", "--length-buckets",
                                             "--batch-size", str(text_batch), *steps, "--iw-samples", "1",
                                             "--iw-sentences", "1", "--iw-batch", "1", "--tok-sentences", "10"],
              t(60, 40), "training tokens/s, paper biva-lstm, bf16, batch 512, length-bucketed batches",
              "train_tokens_per_s", "tokens/s", [Target("train_tokens_per_s", 500_000, ">= 500k tokens/s")],
              peak_keys=text_peaks, partial={"train_tokens_per_s": r"training: ([0-9.]+) tokens/s"}, judged=gpu),
    ]
    if not gpu:
        for e in entries:
            e.what += cpu_note
    if quick:
        return entries
    if compile_entries:
        entries.append(Entry(
            "cifar10-bf16-b48-compiled",
            image + ["--mixed-precision", "bf16", "--batch-size", str(small), *steps, "--iw-samples", k,
                     "--eval-batch-size", k_images, "--compile"], 180,
            "--compile: first step (compilation included, first_step_s), training images/s, then L_1000 through "
            "the compiled forward (its compile: eval_warmup_s)", "train_images_per_s", "images/s",
            [Target("train_images_per_s", 1500, ">= 1,500 images/s"),
             Target("eval_images_per_s", 30, "L_1000 >= 30 images/s")],
            peak_keys=image_peaks, partial=TRAIN_LINE, judged=gpu))
    entries.append(Entry(
        "profile-cifar10-bf16",
        [*child, str(HERE / "profile_step.py"), "--device", device, "--what", "image", "--preset",
         "cifar10" if gpu else "tiny", "--mixed-precision", "bf16", "--batch-size", str(small), "--steps", "3",
         "--warmup", "2", "--rows", "10"], 45,
        "kernel launches per step, GPU busy / idle time per step (torch.profiler), CIFAR-10 bf16 batch 48",
        "kernel_launches_per_step", "launches/step", parse="profile", judged=gpu))
    for e in entries[5:]:
        e.what += cpu_note
    return entries


# ------------------------------------------------------------------------------------------ parsing
def last_json_object(text: str) -> dict | None:
    """The last line of ``text`` that is a JSON object, or None (never raises)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def child_info(text: str) -> dict:
    """What the --child wrapper printed at exit (peak GPU memory), or {}."""
    for line in reversed(text.splitlines()):
        if line.startswith(CHILD_MARK):
            try:
                value = json.loads(line[len(CHILD_MARK):])
            except ValueError:
                return {}
            return value if isinstance(value, dict) else {}
    return {}


PROFILE_LINE = re.compile(r"per step: ([0-9.]+) kernel launches, GPU busy ([0-9.]+) ms, "
                          r"idle between kernels ([0-9.]+) ms")


def profile_figures(text: str) -> dict:
    m = PROFILE_LINE.findall(text)
    if not m:
        return {}
    launches, busy, idle = map(float, m[-1])
    return {"kernel_launches_per_step": launches, "gpu_busy_ms_per_step": busy, "gpu_idle_ms_per_step": idle}


def traceback_of(text: str) -> str | None:
    """Everything from the first traceback of ``text`` to its end (chained exceptions included)."""
    i = text.find("Traceback (most recent call last):")
    return text[i:].rstrip() if i >= 0 else None


def partial_figures(text: str, patterns: dict[str, str]) -> dict:
    found = {}
    for key, pattern in patterns.items():
        hits = re.findall(pattern, text)
        if hits:
            try:
                found[key] = float(hits[-1])
            except ValueError:
                pass
    return found


# ------------------------------------------------------------------------------------------ running
def _write(path: Path, text: str) -> None:
    """Atomic: a reader (or a slot cut short) sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _kill(proc: subprocess.Popen) -> None:
    """A timed-out child: SIGUSR1 first (the --child wrapper dumps every thread's stack into the log),
    then SIGTERM and SIGKILL to its process group (compile workers included)."""
    for sig, wait in ((signal.SIGUSR1, 2.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            if sig == signal.SIGUSR1:
                proc.send_signal(sig)
            else:
                os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            if sig != signal.SIGUSR1:
                break
        except subprocess.TimeoutExpired:
            continue
    try:  # the group may outlive its leader
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_entry(entry: Entry, out: Path, timeout: float) -> dict:
    """Run one entry; never raises for anything the child does."""
    log_path = out / "logs" / f"{entry.name}.log"
    record = {"name": entry.name, "status": "failed", "timeout_s": round(timeout, 1), "command": entry.command,
              "log": str(log_path.relative_to(out)), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **entry.env}
    start = time.perf_counter()
    seen: dict[str, float] = {}  # partial figure -> seconds after the start when its line came
    with open(log_path, "w", buffering=1, errors="replace") as log:
        log.write(f"$ {' '.join(entry.command)}\n# timeout {timeout:.1f} s\n")
        log.flush()
        try:
            proc = subprocess.Popen(entry.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        except OSError as error:
            record.update(error=f"could not start: {error}", wall_s=0.0)
            log.write(record["error"] + "\n")
            return record

        def pump():  # the child's output into the log line by line, as it comes
            try:
                for raw in iter(proc.stdout.readline, b""):
                    line = raw.decode(errors="replace")
                    log.write(line)
                    for key, pattern in entry.partial.items():
                        if key not in seen and re.search(pattern, line):
                            seen[key] = round(time.perf_counter() - start, 1)
            except (OSError, ValueError):  # the log closed under a child that outlived its kill
                pass

        reader = threading.Thread(target=pump, name=f"log-{entry.name}", daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            _kill(proc)
        except BaseException:  # the runner is interrupted: take the child down with it
            _kill(proc)
            raise
        finally:
            reader.join(timeout=10)
        record["wall_s"] = round(time.perf_counter() - start, 1)
        if rc is None:
            log.write(f"\n# gpu_speed: timed out after {timeout:.0f} s; killed\n")
    text = log_path.read_text(errors="replace")
    info = child_info(text)
    if rc is None:
        record.update(status="timeout", error=f"timed out after {timeout:.0f} s (partial log: {record['log']})")
        found = partial_figures(text, entry.partial)
        if found:
            record["partial"] = found
            record["partial_seen_s"] = {k: v for k, v in seen.items() if k in found}
        return record | _peaks(entry, {}, info)
    record["rc"] = rc
    if rc != 0:
        tb = traceback_of(text)
        tail = "\n".join(text.rstrip().splitlines()[-40:])
        record["error"] = f"exit status {rc}\n" + (tb if tb is not None else tail)
        return record | _peaks(entry, {}, info)
    if entry.parse == "profile":
        figures = profile_figures(text)
    else:
        figures = last_json_object(text)
        if figures is None:
            tail = "\n".join(text.rstrip().splitlines()[-20:])
            record["error"] = f"exit status 0 but no JSON object line in the output; its last lines:\n{tail}"
            return record | _peaks(entry, {}, info)
    record.update(status="ok", figures=figures)
    return record | _peaks(entry, figures, info)


def _peaks(entry: Entry, figures: dict, info: dict) -> dict:
    """Peak GPU memory (GiB): the largest the child reported (its timed parts) and the wrapper's at exit."""
    values = [float(figures[k]) * scale for k, scale in entry.peak_keys.items()
              if isinstance(figures.get(k), (int, float))]
    if isinstance(info.get("peak_gpu_memory_gib"), (int, float)):
        values.append(float(info["peak_gpu_memory_gib"]))
    return {"peak_gpu_memory_gib": round(max(values), 3)} if values else {}


def judge(entry: Entry, record: dict, records: dict[str, dict]) -> list[dict]:
    """Each target of ``entry`` with its value and verdict (PASS, FAIL, n/a, pending)."""
    verdicts = []
    for t in entry.targets:
        figures = record.get("figures") or {}
        value, verdict = figures.get(t.key), None
        if t.ratio_of is not None:
            other = records.get(t.ratio_of, {})
            top = (other.get("figures") or {}).get(t.key)
            if other.get("status") in (None, "pending"):
                verdict = "pending"
            value = top / value if isinstance(top, (int, float)) and isinstance(value, (int, float)) and value \
                else None
        if not isinstance(value, (int, float)):
            value = None
        if verdict is None:
            if record.get("status") == "pending":
                verdict = "pending"
            elif value is None:
                verdict = "n/a"
            elif not entry.judged:
                verdict = "not judged (tiny CPU shapes)"
            else:
                verdict = "PASS" if (value > t.threshold if t.strict else value >= t.threshold) else "FAIL"
        verdicts.append({"target": t.label, "key": t.key, "value": value, "threshold": t.threshold,
                         "verdict": verdict})
    return verdicts


def _number(value, unit: str = "") -> str:
    if value is None:
        return "–"
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.2f}" if abs(value) < 10 else f"{value:,.1f}"
    return f"{text} {unit}".strip()


def table(entries: list[Entry], records: dict[str, dict], meta: dict) -> str:
    lines = [f"# GPU speed check ({meta['device']}{', --quick' if meta['quick'] else ''})", "",
             f"{meta['updated']}: {meta['done']} of {len(entries)} entries done, {meta['elapsed_s']:.0f} s of the "
             f"{meta['budget_s']:.0f} s budget used" + (" (finished)" if meta["finished"] else ""), ""]
    if meta["device"] != "cuda":
        lines += ["Not on a GPU: tiny shapes, a check of the pipeline; the figures are not the targets'.", ""]
    lines += ["| # | entry | status | figure | peak GPU memory | wall | log |", "|---|---|---|---|---|---|---|"]
    for i, e in enumerate(entries, 1):
        r = records[e.name]
        value = (r.get("figures") or {}).get(e.figure) if e.figure else None
        if value is None and r.get("partial", {}).get(e.figure) is not None:
            value = r["partial"][e.figure]
            shown = f"{_number(value, e.unit)} (partial)"
        else:
            shown = _number(value if isinstance(value, (int, float)) else None, e.unit)
        status = r["status"]
        if status in ("failed", "timeout"):
            first = (r.get("error") or "").strip().splitlines()
            last = first[-1] if first else ""
            status += f": {last[:120]}".replace("|", "\\|")
        peak, wall = r.get("peak_gpu_memory_gib"), r.get("wall_s")
        peak = "–" if peak is None else f"{peak:.2f} GiB"
        wall = "–" if wall is None else f"{wall:.0f} s"
        lines.append(f"| {i} | {e.name} | {status} | {shown} | {peak} | {wall} | {r.get('log', '–')} |")
    lines += ["", "| target | entry | value | verdict |", "|---|---|---|---|"]
    for e in entries:
        for v in records[e.name].get("targets", []):
            lines.append(f"| {v['target']} | {e.name} | {_number(v['value'])} | {v['verdict']} |")
    extra = []
    for e in entries:
        f = records[e.name].get("figures") or {}
        for key, label in (("first_step_s", "first step (compilation included), s"),
                           ("eval_warmup_s", "L_K warm-up chunk (its compilation, under --compile), s"),
                           ("gpu_busy_ms_per_step", "GPU busy per step, ms"),
                           ("gpu_idle_ms_per_step", "GPU idle between kernels per step, ms")):
            if isinstance(f.get(key), (int, float)) and ("compiled" in e.name or "profile" in e.name):
                extra.append(f"| {e.name} | {label} | {_number(f[key])} |")
    if extra:
        lines += ["", "| entry | figure | value |", "|---|---|---|", *extra]
    lines += ["", "What each entry measures:", ""] + [f"- {e.name}: {e.what}" for e in entries]
    return "\n".join(lines) + "\n"


def run_all(entries: list[Entry], out: Path, budget_s: float, device: str = "cuda", quick: bool = False,
            progress=sys.stderr, min_entry_s: float = 10.0) -> dict:
    """Run ``entries`` in order within ``budget_s``, writing each entry's JSON and log as it ends and the
    summary and table after every entry; an entry left less than ``min_entry_s`` (or its own timeout, if
    shorter) of the budget is skipped. Returns the summary."""
    for e in entries:
        if not NAME_OK.match(e.name):
            raise ValueError(f"entry name {e.name!r}: use letters, digits, '.', '_' and '-' only")
    if len({e.name for e in entries}) != len(entries):
        raise ValueError("entry names must be unique")
    (out / "entries").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    records = {e.name: {"name": e.name, "status": "pending", "timeout_s": e.timeout_s, "what": e.what}
               for e in entries}
    t0 = time.perf_counter()
    meta = {"benchmark": "gpu_speed", "device": device, "quick": quick, "budget_s": budget_s,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "python": sys.executable}

    def write(finished: bool) -> dict:
        for e in entries:
            records[e.name]["targets"] = judge(e, records[e.name], records)
        meta.update(updated=time.strftime("%Y-%m-%dT%H:%M:%S"), elapsed_s=round(time.perf_counter() - t0, 1),
                    finished=finished, done=sum(r["status"] not in ("pending", "running") for r in records.values()))
        summary = {**meta, "entries": [records[e.name] for e in entries]}
        try:
            _write(out / "summary.json", json.dumps(summary, indent=2, default=str))
            _write(out / "table.md", table(entries, records, meta))
        except OSError as error:  # a full disk must not stop the measurements
            print(f"gpu_speed: could not write the summary: {error}", file=progress)
        return summary

    write(False)
    for i, e in enumerate(entries, 1):
        left = budget_s - (time.perf_counter() - t0)
        timeout = min(e.timeout_s, left)
        if timeout < min(e.timeout_s, min_entry_s):
            records[e.name].update(status="skipped", error=f"skipped: {left:.0f} s of the budget left")
        else:
            records[e.name]["status"] = "running"
            write(False)
            print(f"[{i}/{len(entries)}] {e.name} (timeout {timeout:.0f} s) ...", file=progress, flush=True)
            try:
                result = run_entry(e, out, timeout)
            except KeyboardInterrupt:
                records[e.name].update(status="interrupted", error="the runner was interrupted")
                write(True)
                raise
            except Exception:  # noqa: BLE001 - the runner's own fault with this entry: record it, go on
                result = {"name": e.name, "status": "failed", "error": "gpu_speed runner:\n" + traceback.format_exc()}
            records[e.name].update(result)
        records[e.name]["targets"] = judge(e, records[e.name], records)
        try:
            _write(out / "entries" / f"{e.name}.json", json.dumps(records[e.name], indent=2, default=str))
        except OSError as error:
            print(f"gpu_speed: could not write {e.name}.json: {error}", file=progress)
        r = records[e.name]
        figure = (r.get("figures") or {}).get(e.figure) if e.figure else None
        verdicts = ", ".join(f"{v['target']}: {v['verdict']}" for v in r["targets"])
        print(f"[{i}/{len(entries)}] {e.name}: {r['status']}"
              + (f", {_number(figure, e.unit)}" if isinstance(figure, (int, float)) else "")
              + (f" ({r['wall_s']:.0f} s)" if r.get("wall_s") is not None else "")
              + (f"; {verdicts}" if verdicts else ""), file=progress, flush=True)
        write(False)
    return write(True)


# --------------------------------------------------------------------------------------------- child
def child_main(argv: list[str]) -> None:
    """``--child SCRIPT ARGS...``: run SCRIPT as __main__ with faulthandler on SIGUSR1 and, at exit, one
    line of peak GPU memory (and torch._dynamo's compile times when it compiled)."""
    import atexit
    import faulthandler
    import runpy

    faulthandler.register(signal.SIGUSR1, all_threads=True)

    def report():
        info = {}
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                info["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                info["device_name"] = torch.cuda.get_device_name()
            dynamo = sys.modules.get("torch._dynamo.utils")
            if dynamo is not None and getattr(dynamo, "compilation_time_metrics", None):  # something compiled
                print("torch._dynamo compile times:\n" + dynamo.compile_times(repr="str"), file=sys.stderr,
                      flush=True)
        except Exception as error:  # noqa: BLE001 - a report at exit must not change the exit status
            info["report_error"] = repr(error)
        print(CHILD_MARK + json.dumps(info), flush=True)

    atexit.register(report)
    script = argv[0]
    sys.argv = list(argv)
    sys.path[0] = str(Path(script).resolve().parent)
    runpy.run_path(script, run_name="__main__")


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                   help="folder for entries/, logs/, summary.json and table.md (default: $OUT when set)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="default cuda; cpu runs every entry on tiny shapes (the pipeline, not the figures)")
    p.add_argument("--quick", action="store_true", help="entries 1-5 only, fewer steps: 3 minutes on a GPU")
    p.add_argument("--no-compile", action="store_true", help="leave out the --compile entry")
    p.add_argument("--entries", help="comma-separated names: run only these (in the check's order)")
    p.add_argument("--entries-file", type=Path,
                   help="a JSON list of entries to run instead of the built-in ones (fields of Entry; for tests)")
    p.add_argument("--entry-timeout-s", type=float, help="every entry's timeout, instead of its own")
    p.add_argument("--budget-s", type=float,
                   help=f"wall-clock seconds for all entries (default {FULL_BUDGET_S}, --quick {QUICK_BUDGET_S}); "
                        "an entry's timeout is cut to what is left, and entries are skipped once it is spent")
    p.add_argument("--list", action="store_true", help="print the entries (name, timeout, command) and exit")
    args = p.parse_args(argv)
    if args.out is None and not args.list:
        p.error("--out DIR is needed (or $OUT)")
    return args


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        child_main(argv[1:])
        return None
    args = parse_args(argv)
    if args.entries_file:
        entries = [Entry.from_dict(d) for d in json.loads(args.entries_file.read_text())]
    else:
        entries = builtin_entries(args.device, args.quick, not args.no_compile)
    if args.entries:
        wanted = [n.strip() for n in args.entries.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {e.name for e in entries})
        if unknown:
            print(f"error: unknown entries {', '.join(unknown)}; known: {', '.join(e.name for e in entries)}",
                  file=sys.stderr)
            sys.exit(2)
        entries = [e for e in entries if e.name in wanted]
    if args.entry_timeout_s:
        for e in entries:
            e.timeout_s = args.entry_timeout_s
    budget = args.budget_s or (QUICK_BUDGET_S if args.quick else FULL_BUDGET_S)
    if args.entry_timeout_s and not args.budget_s:
        budget = max(budget, args.entry_timeout_s * len(entries))
    if args.list:
        for i, e in enumerate(entries, 1):
            print(f"{i}. {e.name} (timeout {e.timeout_s:.0f} s): {e.what}\n   $ {' '.join(e.command)}")
        print(f"timeouts sum to {sum(e.timeout_s for e in entries):.0f} s; budget {budget:.0f} s")
        return None
    def stop(signum, frame):  # a slot ending: the running child is killed and the summary written (run_all)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    try:
        summary = run_all(entries, args.out, budget, args.device, args.quick)
    except KeyboardInterrupt as stopped:
        print(f"gpu_speed: stopped ({stopped or 'SIGINT'}); what was measured is under {args.out}", file=sys.stderr)
        sys.exit(130)
    print(table(entries, {r["name"]: r for r in summary["entries"]}, summary), end="")
    print(json.dumps({"benchmark": "gpu_speed", "out": str(args.out), "elapsed_s": summary["elapsed_s"],
                      "entries": {r["name"]: r["status"] for r in summary["entries"]},
                      "verdicts": {f"{r['name']}: {v['target']}": v["verdict"]
                                   for r in summary["entries"] for v in r.get("targets", [])}}))
    return summary


if __name__ == "__main__":
    main()
