import pytest
"""benchmarks/gpu_speed.py, the prepared GPU check, on a CPU in seconds: its runner with fake entries
(one that succeeds, one that raises, one that prints garbage, one that hangs past its timeout, one that
cannot start) leaves every figure, the whole traceback, the timeout mark and the table and summary on
disk, and exits normally; the built-in plan fits its budgets; one real entry runs on tiny CPU shapes."""
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_speed.py"


def _module():
    spec = importlib.util.spec_from_file_location("benchmarks_gpu_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


GOOD = _py("import json, sys\n"
           "print('warming up', file=sys.stderr)\n"
           "print('a line that is not the result')\n"
           "print(json.dumps({'train_images_per_s': 2000.0, 'peak_gpu_memory_gib': 1.25}))\n"
           "print('a stray line after the JSON', file=sys.stderr)\n")
FAILING = _py("def inner():\n"
              "    raise ValueError('deliberate failure for the test')\n"
              "def outer():\n"
              "    try:\n"
              "        inner()\n"
              "    except ValueError as error:\n"
              "        raise RuntimeError('outer wrapper of the failure') from error\n"
              "print('before the failure', flush=True)\n"
              "outer()\n")
GARBAGE = _py("print('this is not JSON {'); print('{broken: json}'); print('[1, 2]')")
HANGING = _py("import time\nprint('started', flush=True)\nprint('step 7', flush=True)\ntime.sleep(60)\n")
SECOND = _py("import json; print(json.dumps({'train_images_per_s': 1000.0}))")


def fake_entries(tmp_path: Path | None = None) -> list[dict]:
    """The fake entries; with ``tmp_path`` the hanging one runs under gpu_speed's --child wrapper, as the
    real entries do (its log then holds every thread's stack at the timeout)."""
    hanging = HANGING
    if tmp_path is not None:
        script = tmp_path / "hang.py"
        script.write_text(HANGING[-1])
        hanging = [sys.executable, str(SCRIPT), "--child", str(script)]
    return [
        {"name": "good", "command": GOOD, "timeout_s": 20, "figure": "train_images_per_s", "unit": "images/s",
         "targets": [{"key": "train_images_per_s", "threshold": 1500, "label": ">= 1,500"}],
         "peak_keys": {"peak_gpu_memory_gib": 1.0}},
        {"name": "failing", "command": FAILING, "timeout_s": 20, "figure": "train_images_per_s",
         "targets": [{"key": "train_images_per_s", "threshold": 1, "label": ">= 1"}]},
        {"name": "garbage", "command": GARBAGE, "timeout_s": 20},
        {"name": "hanging", "command": hanging, "timeout_s": 1.5, "partial": {"step": r"step (\d+)"}},
        {"name": "missing", "command": ["/nonexistent/gpu-speed-binary"], "timeout_s": 5},
        {"name": "second", "command": SECOND, "timeout_s": 20, "figure": "train_images_per_s",
         "targets": [{"key": "train_images_per_s", "threshold": 1.0, "label": "good / second > 1", "strict": True,
                      "ratio_of": "good"},
                     {"key": "train_images_per_s", "threshold": 1500, "label": ">= 1,500"}]},
    ]


def test_runner_keeps_every_result_on_disk(tmp_path):
    spec = tmp_path / "entries.json"
    spec.write_text(json.dumps(fake_entries(tmp_path)))
    out = tmp_path / "out"
    start = time.perf_counter()
    p = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--entries-file", str(spec),
                        "--budget-s", "120"], capture_output=True, text=True, timeout=120, check=False)
    wall = time.perf_counter() - start
    assert p.returncode == 0, p.stderr
    assert wall < 60  # the hanging entry was cut at its 1.5 s timeout
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["entries"] == {"good": "ok", "failing": "failed", "garbage": "failed", "hanging": "timeout",
                               "missing": "failed", "second": "ok"}

    entries = {path.stem: json.loads(path.read_text()) for path in (out / "entries").glob("*.json")}
    assert set(entries) == {"good", "failing", "garbage", "hanging", "missing", "second"}
    for name in entries:
        assert (out / "logs" / f"{name}.log").exists()

    good = entries["good"]
    assert good["figures"]["train_images_per_s"] == 2000.0
    assert good["peak_gpu_memory_gib"] == 1.25
    assert [v["verdict"] for v in good["targets"]] == ["PASS"]
    assert "warming up" in (out / "logs" / "good.log").read_text()  # stderr is in the log too

    failing = entries["failing"]
    error = failing["error"]
    assert error.startswith("exit status 1")
    for piece in ("Traceback (most recent call last):", "in inner", "ValueError: deliberate failure for the test",
                  "The above exception was the direct cause", "in outer", "RuntimeError: outer wrapper"):
        assert piece in error, piece
    log = (out / "logs" / "failing.log").read_text()
    assert "before the failure" in log and "ValueError: deliberate failure for the test" in log
    assert [v["verdict"] for v in failing["targets"]] == ["n/a"]

    assert "no JSON object" in entries["garbage"]["error"]
    assert "this is not JSON {" in entries["garbage"]["error"]

    hanging = entries["hanging"]
    assert hanging["status"] == "timeout" and "timed out after" in hanging["error"]
    assert hanging["partial"] == {"step": 7.0} and 0 <= hanging["partial_seen_s"]["step"] < 1.5
    hang_log = (out / "logs" / "hanging.log").read_text()
    assert "started" in hang_log and "timed out" in hang_log
    assert "most recent call first" in hang_log and "hang.py" in hang_log  # the stack at the timeout

    assert "could not start" in entries["missing"]["error"]

    second = entries["second"]
    assert [(v["value"], v["verdict"]) for v in second["targets"]] == [(2.0, "PASS"), (1000.0, "FAIL")]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] is True
    assert [r["name"] for r in summary["entries"]] == [e["name"] for e in fake_entries()]
    assert [r["status"] for r in summary["entries"]] == ["ok", "failed", "failed", "timeout", "failed", "ok"]
    table = (out / "table.md").read_text()
    for name in entries:
        assert f"| {name} |" in table
    assert "2,000 images/s" in table and "timeout" in table and "PASS" in table and "FAIL" in table
    assert "outer wrapper" in table  # a failed entry's row ends with its error's last line


def test_summary_is_written_before_and_after_every_entry_and_the_budget_skips(tmp_path):
    gs = _module()
    entries = [gs.Entry.from_dict(d) for d in fake_entries() if d["name"] in ("good", "hanging", "second")]
    entries[1].timeout_s = 30  # the budget, not its own timeout, cuts it
    seen = []

    class Progress:  # the runner's progress stream: look at the summary on disk at each line
        def write(self, text):
            if text.strip():
                path = tmp_path / "summary.json"
                seen.append(json.loads(path.read_text())["done"] if path.exists() else None)

        def flush(self):
            pass

    summary = gs.run_all(entries, tmp_path, budget_s=2.5, device="cpu", progress=Progress(), min_entry_s=1.0)
    statuses = [r["status"] for r in summary["entries"]]
    assert statuses == ["ok", "timeout", "skipped"]
    assert "budget" in summary["entries"][2]["error"]
    assert seen[0] == 0 and max(seen) >= 2  # on disk from the start, updated as entries end
    assert (tmp_path / "entries" / "second.json").exists()  # a skipped entry is written too


def test_guarded_parsing():
    gs = _module()
    assert gs.last_json_object("noise\n{\"a\": 1}\n{not json}\n[1]\n") == {"a": 1}
    assert gs.last_json_object("nothing here {") is None
    assert gs.child_info(f"x\n{gs.CHILD_MARK}{{\"peak_gpu_memory_gib\": 2.0}}\n") == {"peak_gpu_memory_gib": 2.0}
    assert gs.child_info(f"{gs.CHILD_MARK}garbage") == {}
    report = "per step: 6612 kernel launches, GPU busy 12.50 ms, idle between kernels 40.25 ms"
    assert gs.profile_figures(report) == {"kernel_launches_per_step": 6612.0, "gpu_busy_ms_per_step": 12.5,
                                          "gpu_idle_ms_per_step": 40.25}


def test_builtin_plan_is_ordered_and_fits_its_budgets():
    gs = _module()
    full = gs.builtin_entries("cuda")
    names = [e.name for e in full]
    assert names == ["cifar10-bf16-b48", "cifar10-fp32-b48", "cifar10-bf16-b256", "cifar10-L1000",
                     "text-biva-lstm-b512", "cifar10-bf16-b48-compiled", "profile-cifar10-bf16"]
    assert sum(e.timeout_s for e in full) <= gs.FULL_BUDGET_S == 480
    quick = gs.builtin_entries("cuda", quick=True)
    assert [e.name for e in quick] == names[:5]
    assert sum(e.timeout_s for e in quick) <= gs.QUICK_BUDGET_S == 180
    targets = {e.name: [(t.key, t.threshold) for t in e.targets] for e in full}
    assert targets["cifar10-bf16-b48"] == [("train_images_per_s", 1500)]
    assert targets["cifar10-bf16-b256"] == [("train_images_per_s", 4000)]
    assert targets["cifar10-L1000"] == [("eval_images_per_s", 30)]
    assert targets["text-biva-lstm-b512"] == [("train_tokens_per_s", 500_000)]
    assert full[1].targets[0].ratio_of == "cifar10-bf16-b48"
    b48 = full[0].command
    assert b48[b48.index("--batch-size") + 1] == "48" and "bf16" in b48 and "cifar10" in b48
    text = full[4].command
    assert text[text.index("--batch-size") + 1] == "512" and "--preset" not in text  # the paper preset
    assert "--compile" in full[5].command
    assert all(e.judged for e in full) and not any(e.judged for e in gs.builtin_entries("cpu"))
    assert "--compile" not in " ".join(" ".join(e.command) for e in gs.builtin_entries("cuda", compile_entries=False))


@pytest.mark.slow
def test_real_entries_on_tiny_cpu_shapes(tmp_path):
    """The three scripts the GPU check runs (image_throughput, text_throughput, profile_step) still run
    under its --child wrapper: a broken import there would cost a GPU slot all its figures."""
    out = tmp_path / "out"
    names = ["cifar10-bf16-b48", "text-biva-lstm-b512", "profile-cifar10-bf16"]
    p = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--device", "cpu",
                        "--entries", ",".join(names)], capture_output=True, text=True, timeout=180, check=False)
    assert p.returncode == 0, p.stderr
    entries = {n: json.loads((out / "entries" / f"{n}.json").read_text()) for n in names}
    for name, entry in entries.items():
        assert entry["status"] == "ok", (name, entry.get("error"))
        assert "GPU_SPEED_CHILD" in (out / "logs" / f"{name}.log").read_text()  # the --child wrapper ran it
    image = entries["cifar10-bf16-b48"]
    assert image["figures"]["train_images_per_s"] > 0 and image["figures"]["preset"] == "tiny"
    assert image["targets"][0]["verdict"].startswith("not judged")
    assert entries["text-biva-lstm-b512"]["figures"]["train_tokens_per_s"] > 0
    assert "image training step" in (out / "logs" / "profile-cifar10-bf16.log").read_text()
