"""The engine survives: SIGKILL at any moment (mid-step, inside a checkpoint write, during
validation), a scheduler's SIGTERM and non-finite or huge updates. A run interrupted and resumed many
times ends with the same weights, EMA, free-bits state, metrics and samples as an uninterrupted one;
the latest checkpoint always loads; retention keeps the last N checkpoints and the exported EMA
weights are always the latest checkpoint's."""
import copy
import json
import math
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from core_utils import ArrayDataset, build, stripes, tiny_image_config, tiny_run
from safetensors.torch import load_file
from script_utils import (ROOT, checkpoint_steps, image_folder, metrics, run_script, script_command, script_env,
                          snapshot, without_timing)

from shared.debug_hooks import Faults
from shared.distributions import TrainNoise
from shared.engine import Trainer
from shared.errors import UserError
from shared.checkpoints import latest_checkpoint
from shared.run_dir import check_output_dir, write_run_config

# ---------------------------------------------------------------------------------------------- kills


def assert_close(a, b, where="metrics"):
    """Equal structure; numbers equal to float tolerance."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    elif isinstance(a, (int, float)) and not isinstance(a, bool):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), where
    else:
        assert a == b, where


def assert_same_tensors(path_a, path_b):
    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k


def exported_is_latest(out):
    """model.safetensors holds the EMA weights of the latest complete checkpoint."""
    step, path = latest_checkpoint(out)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(path / "ema.safetensors"))
    return all(torch.equal(a[k], b[k]) for k in a)


def resumed_from(stderr):
    line = next(line for line in stderr.splitlines() if line.startswith("resuming from "))
    return int(line.rsplit("(step ", 1)[1].rstrip(")"))


def complete_records(out):
    """metrics.jsonl as a reader beside the writing process sees it: only whole lines (a record may be
    half written at the moment of reading)."""
    text = (out / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    data = image_folder(tmp_path / "data")
    # 63 training images, batches of 8: 7 steps per epoch, so checkpoints and kills fall mid-epoch.
    common = ["--data-dir", data, "--cache-dir", tmp_path / "cache", "--preset", "tiny", "--batch-size", 8,
              "--eval-every", 3, "--save-every", 4, "--log-every", 2, "--keep-checkpoints", 2,
              # the budget drops at most validations (2.5 -> 2 -> 1.6 ...): its state must survive too
              "--free-bits-patience", 1, "--free-bits-threshold", 1000, "--free-bits-factor", 0.8]
    ref, out = tmp_path / "ref", tmp_path / "run"
    # The uninterrupted run, alongside the interrupted one (35 is off every grid: a final checkpoint,
    # a partial train record and a final validation follow the last step).
    reference = subprocess.Popen(script_command("train_image.py", *common, "--output-dir", ref, "--max-steps", 35),
                                 cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(*extra, faults=None):
        return run_script("train_image.py", *common, "--output-dir", out, *extra,
                          env=script_env(**({"BIVA_FAULTS": faults} if faults else {})))

    # 1. A shorter run ends at step 10, off the grid: its final validation comes after its last checkpoint.
    p = run("--max-steps", 10)
    assert p.returncode == 0, p.stderr[-2000:]
    assert checkpoint_steps(out) == [8, 10] and exported_is_latest(out)
    assert metrics(out)[-1]["step"] == 10 and metrics(out)[-1]["split"] == "valid"

    # 2. Extended to 35 and killed inside the step-16 checkpoint write, before the rename.
    p = run("--resume", "--max-steps", 35, faults="kill-saved@16")
    assert p.returncode == -signal.SIGKILL and resumed_from(p.stderr) == 10
    assert (out / "checkpoints" / ".tmp_step_16" / "trainer_state.json").is_file()
    assert checkpoint_steps(out) == [10, 12] and exported_is_latest(out)

    # 3. Killed after the step-20 checkpoint is renamed into place, before its weights are exported.
    p = run("--resume", "--max-steps", 35, faults="kill-renamed@20")
    assert p.returncode == -signal.SIGKILL and resumed_from(p.stderr) == 12
    assert checkpoint_steps(out)[-1] == 20 and not exported_is_latest(out)

    # 4. Killed during the step-24 validation, after its record reached metrics.jsonl.
    p = run("--resume", "--max-steps", 35, faults="kill-eval@24")
    assert p.returncode == -signal.SIGKILL and resumed_from(p.stderr) == 20
    assert exported_is_latest(out)  # the resume re-exported step 20's EMA
    assert metrics(out)[-1]["step"] == 24 and metrics(out)[-1]["split"] == "valid"

    # 5. SIGKILL from outside, mid-training, once the step-26 record is written.
    proc = subprocess.Popen(script_command("train_image.py", *common, "--output-dir", out, "--resume", "--max-steps", 35),
                            cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if any(r.get("split") == "train" and r["step"] >= 26 for r in complete_records(out)):
            proc.kill()
            break
        time.sleep(0.01)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and resumed_from(stderr) == 20
    latest = checkpoint_steps(out)[-1]
    assert 24 <= latest < 33  # 24 or 28, unless the kill came late

    # 6. A scheduler's SIGTERM as step 33 starts: checkpoint at 33, exit 143, the command to resume.
    p = run("--resume", "--max-steps", 35, faults="sigterm@33")
    assert p.returncode == 143 and resumed_from(p.stderr) == latest
    said = [line for line in p.stderr.splitlines() if line.startswith("received SIGTERM")]
    assert len(said) == 1 and f"checkpoint {out / 'checkpoints' / 'step_33'} at step 33" in said[0]
    assert checkpoint_steps(out) == [32, 33] and exported_is_latest(out)

    # 7. The printed command finishes the run.
    command = shlex.split(said[0].split("resume with: ", 1)[1])
    assert command[0] == "python" and command.count("--resume") == 1 and str(data) in command
    p = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=ROOT, env=script_env())
    assert p.returncode == 0 and resumed_from(p.stderr) == 33, p.stderr[-2000:]

    stdout, stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, stderr[-2000:]
    # Same records in the same order (the timing figures aside), weights, EMA, optimiser-free state.
    assert_close(without_timing(metrics(out)), without_timing(metrics(ref)))
    assert checkpoint_steps(out) == [33, 35] and checkpoint_steps(ref) == [32, 35]
    assert_same_tensors(out / "model.safetensors", ref / "model.safetensors")
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(out / "checkpoints" / "step_35" / name, ref / "checkpoints" / "step_35" / name)
    state, ref_state = (json.loads((d / "checkpoints" / "step_35" / "trainer_state.json").read_text()) for d in (out, ref))
    assert state["train"] == ref_state["train"]
    assert_close(state["free_bits"], ref_state["free_bits"])
    assert ref_state["free_bits"]["budget"] < 2.5
    assert exported_is_latest(out) and exported_is_latest(ref)
    # Samples are drawn from their own seeded RNG: the same images at the same steps.
    samples, ref_samples = snapshot(out / "samples"), snapshot(ref / "samples")
    assert set(ref_samples) <= set(samples)
    assert all(samples[name] == ref_samples[name] for name in ref_samples)


# ---------------------------------------------------------------------------------------- bad updates
TRAIN, VALID = stripes(64, seed=0), stripes(16, seed=1)


def make_trainer(out, resume=False, **kw):
    cfg = tiny_image_config("biva")
    run = tiny_run(cfg, **{"max_steps": 6, "eval_every": 3, "save_every": 3, "log_every": 3, "skip_threshold": 1e4,
                           **kw})
    check_output_dir(out, resume)
    if not resume:
        out.mkdir(parents=True)
        write_run_config(out, run)
    return Trainer(run, build(cfg), ArrayDataset(TRAIN), ArrayDataset(VALID), out, resume=resume)


def state_of(trainer):
    return {"params": {k: v.clone() for k, v in trainer.raw_model.state_dict().items()},
            "ema": {k: v.clone() for k, v in trainer.ema.state_dict().items()},
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
            "step": trainer.state.step}


def same_tensors(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def test_a_bad_update_touches_nothing(tmp_path):
    trainer = make_trainer(tmp_path / "run")
    batches, noise = trainer._loader(), TrainNoise()
    trainer._update(next(batches), noise)  # one good step, so the optimiser has state to keep
    for attempt, kind in enumerate(["nan-loss", "nan-grad", "big-grad"], start=2):
        trainer.faults = Faults(0, f"{kind}@{attempt}")
        before = state_of(trainer)
        result = trainer._update(next(batches), noise)
        assert result["skipped"], kind
        assert same_tensors(state_of(trainer), before), kind  # weights, EMA, optimiser, step
        assert trainer.state.skipped_total == attempt - 1 and trainer.state.skipped_in_row == attempt - 1
        assert trainer.state.batch_in_epoch == attempt  # the batch is consumed all the same
    assert result["grad_norm"] > 1e4  # big-grad: finite, above --skip-threshold
    before = state_of(trainer)
    result = trainer._update(next(batches), noise)
    assert not result["skipped"] and trainer.state.step == 2 and trainer.state.skipped_in_row == 0
    assert not same_tensors(state_of(trainer)["params"], before["params"])


def test_skips_are_logged_and_do_not_count_as_steps(tmp_path):
    trainer = make_trainer(tmp_path / "run")
    trainer.faults = Faults(0, "nan-loss@3,big-grad@5")
    summary = trainer.fit()
    assert summary["step"] == 6 and summary["skipped_total"] == 2
    assert trainer.state.examples_seen == 8 * 16
    records = metrics(tmp_path / "run")
    skips = [r for r in records if r.get("event") == "skipped_update"]
    assert [(r["step"], r["skipped_total"]) for r in skips] == [(2, 1), (3, 2)]
    assert math.isnan(skips[0]["loss"]) and skips[1]["grad_norm"] > 1e4
    assert [r["skipped_total"] for r in records if r.get("split") == "train"] == [1, 2]


def test_too_many_skips_stop_and_keep_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    trainer = make_trainer(out, max_skips=2)
    trainer.faults = Faults(0, "nan-grad@4,nan-loss@5,big-grad@6")
    with pytest.raises(UserError, match=r"3 updates in a row .*--max-skips 2.*checkpoint is intact"):
        trainer.fit()
    assert checkpoint_steps(out) == [3] and exported_is_latest(out)
    kept = snapshot(out / "checkpoints")
    resumed = make_trainer(out, resume=True, max_skips=2)  # no faults now
    assert resumed.resumed_from == 3
    assert snapshot(out / "checkpoints") == kept  # loading changed nothing
    assert resumed.fit()["step"] == 6


def test_retention_keeps_the_last_n_and_exports_the_latest(tmp_path):
    out = tmp_path / "run"
    trainer = make_trainer(out, max_steps=5, save_every=1, keep_checkpoints=2)
    seen, save = [], trainer.save_checkpoint

    def save_and_look():
        path = save()
        seen.append((checkpoint_steps(out), exported_is_latest(out)))
        return path

    trainer.save_checkpoint = save_and_look
    trainer.fit()
    assert seen == [([1], True), ([1, 2], True), ([2, 3], True), ([3, 4], True), ([4, 5], True)]
    assert not list((out / "checkpoints").glob(".tmp_*"))


# ------------------------------------------------------------------------------------ --max-minutes


def test_max_minutes_ends_the_run_as_its_last_step_would(tmp_path):
    """Out of time after step 4 of 6: checkpoint, final validation and export as a 4-step run's."""
    out, ref = tmp_path / "run", tmp_path / "ref"
    trainer = make_trainer(out, max_minutes=1000.0)
    trainer.faults = Faults(0, "out-of-time@4")
    assert trainer.fit()["step"] == 4
    make_trainer(ref, max_steps=4).fit()
    assert checkpoint_steps(out) == checkpoint_steps(ref) == [3, 4] and exported_is_latest(out)
    assert without_timing(metrics(out)) == without_timing(metrics(ref))
    assert metrics(out)[-1]["split"] == "valid" and metrics(out)[-1]["step"] == 4
    assert_same_tensors(out / "model.safetensors", ref / "model.safetensors")
    state = json.loads((out / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["train_seconds"] > 0


def test_max_minutes_counts_earlier_sessions_on_resume(tmp_path):
    out = tmp_path / "run"
    assert make_trainer(out, max_minutes=1e-9).fit()["step"] == 1  # the real clock: time is up after one step
    kept = snapshot(out / "checkpoints")
    assert checkpoint_steps(out) == [1]
    again = make_trainer(out, resume=True, max_minutes=1e-9)
    assert again.train_seconds > 0  # the first session's time, from the checkpoint
    assert again.fit()["step"] == 1 and snapshot(out / "checkpoints") == kept  # trains no further
    longer = make_trainer(out, resume=True, max_minutes=1000.0)  # a larger limit continues the run
    assert longer.fit()["step"] == 6 and checkpoint_steps(out) == [1, 3, 6]
