"""Storage faults: a checkpoint whose files were damaged after it was saved is found on --resume (the
checksums of its manifest) and the newest intact one is used instead, with one warning line; a full
disk while a checkpoint or the weights are written stops the run (every process) with one line and
loses nothing: the last good checkpoint and model.safetensors stay byte for byte, no temporary file is
left, and --resume then finishes the run as if nothing had happened. metrics.jsonl on a full disk is
held in memory until there is space or the next checkpoint; samples are skipped; any script's full
disk is one line and exit 74."""
import errno
import json
import os
import re
import shutil
import subprocess

import pytest
from script_utils import (ROOT, TORCHRUN, checkpoint_steps, image_folder, metrics, run_script, script_env, snapshot,
                          torchrun_command, without_timing)
from test_faults import assert_close, assert_same_tensors, exported_is_latest, make_trainer, resumed_from

from shared.debug_hooks import Faults
from shared.checkpoints import STORAGE_EXIT_CODE
from shared.errors import UserError

STEPS = 12


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """Tiny image data, the flags of every run here, and an uninterrupted reference run of STEPS steps."""
    root = tmp_path_factory.mktemp("storage")
    common = ["--data-dir", image_folder(root / "data"), "--cache-dir", root / "cache", "--preset", "tiny",
              "--batch-size", 8, "--eval-every", 4, "--save-every", 4, "--log-every", 2, "--keep-checkpoints", 3]
    ref = root / "ref"
    p = run_script("train_image.py", *common, "--output-dir", ref, "--max-steps", STEPS)
    assert p.returncode == 0, p.stderr[-2000:]
    return common, ref


def assert_same_run(out, ref):
    """Same metrics (timing aside), exported weights, last checkpoint's weights, EMA and trainer state."""
    assert_close(without_timing(metrics(out)), without_timing(metrics(ref)))
    assert_same_tensors(out / "model.safetensors", ref / "model.safetensors")
    last = f"checkpoints/step_{STEPS}"
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(out / last / name, ref / last / name)
    state, ref_state = (json.loads((d / last / "trainer_state.json").read_text()) for d in (out, ref))
    assert state["train"] == ref_state["train"]
    assert_close(state["free_bits"], ref_state["free_bits"])
    assert exported_is_latest(out)


def flip_bytes(path, at=0.5, n=16):
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i:i + n] = bytes(b ^ 0xFF for b in data[i:i + n])
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_corrupted_latest_checkpoint_resumes_from_the_one_before(tmp_path, image_run):
    common, ref = image_run
    out = tmp_path / "run"
    shutil.copytree(ref, out)  # a finished run, as the reference
    assert checkpoint_steps(out) == [4, 8, 12]
    manifest = json.loads((out / "checkpoints" / "step_12" / "manifest.json").read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", "ema.safetensors", "trainer_state.json"} <= manifest.keys()
    flip_bytes(out / "checkpoints" / "step_12" / "model.safetensors")  # same size: only the checksum tells

    p = run_script("train_image.py", *common, "--output-dir", out, "--resume", "--max-steps", STEPS)
    assert p.returncode == 0, p.stderr[-2000:]
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1, p.stderr[-2000:]
    assert str(out / "checkpoints" / "step_12") in warnings[0] and "model.safetensors" in warnings[0]
    assert "step_12.damaged" in warnings[0] and resumed_from(p.stderr) == 8
    # Set aside, not deleted, and out of the way: step 12 was saved again, retention counts only intact ones.
    assert (out / "checkpoints" / "step_12.damaged" / "model.safetensors").is_file()
    assert checkpoint_steps(out) == [4, 8, 12]
    assert_same_run(out, ref)


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_loses_nothing(tmp_path, image_run):
    common, ref = image_run
    out = tmp_path / "run"
    p = run_script("train_image.py", *common, "--output-dir", out, "--max-steps", 4)
    assert p.returncode == 0, p.stderr[-2000:]
    before = snapshot(out)
    before.pop("metrics.jsonl")

    p = run_script("train_image.py", *common, "--output-dir", out, "--resume", "--max-steps", STEPS,
                   env=script_env(BIVA_FAULTS="enospc-save@8"))
    assert p.returncode == STORAGE_EXIT_CODE, p.stderr[-2000:]
    said = [line for line in p.stderr.splitlines() if line.startswith("stopped:")]
    assert len(said) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "no space left on device" in said[0] and "checkpoints/step_8" in said[0]
    assert f"last good checkpoint {out / 'checkpoints' / 'step_4'} (step 4) is intact" in said[0]
    assert "weights of step 4" in said[0] and re.search(r"resume with: python .*--resume", said[0])
    after = snapshot(out)
    assert {k: after[k] for k in before} == before  # config, step_4, model.safetensors byte for byte
    # new files only where a resumed launch logs (samples, metrics, its own TensorBoard event file)
    assert not [k for k in after if k not in before and not k.startswith(("samples/", "tensorboard/"))
                and k != "metrics.jsonl"]
    assert checkpoint_steps(out) == [4]

    p = run_script("train_image.py", *common, "--output-dir", out, "--resume", "--max-steps", STEPS)
    assert p.returncode == 0 and resumed_from(p.stderr) == 4, p.stderr[-2000:]
    assert_same_run(out, ref)


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun is not installed next to python")
def test_a_full_disk_on_one_process_stops_both(tmp_path, image_run):
    """Process 1 alone fails while process 0 goes on: no hang, both stop, one line from the main process."""
    common, _ = image_run
    out = tmp_path / "run"
    p = subprocess.run(torchrun_command("train_image.py", *common, "--output-dir", out, "--max-steps", 8),
                       capture_output=True, text=True, cwd=ROOT, env=script_env(BIVA_FAULTS="enospc-save@8:1"),
                       timeout=120)
    assert p.returncode != 0
    said = [line for line in p.stderr.splitlines() if line.startswith("stopped:")]
    assert len(said) == 1 and "no space left on device on process 1" in said[0], p.stderr[-3000:]
    assert checkpoint_steps(out) == [4] and exported_is_latest(out)
    assert not list((out / "checkpoints").glob(".tmp_*"))


# ------------------------------------------------------------------------------------- in process


def test_a_full_disk_while_exporting_keeps_the_weights(tmp_path):
    out = tmp_path / "run"
    trainer = make_trainer(out)  # checkpoints at steps 3 and 6
    trainer.faults = Faults(0, "enospc-export@6")
    exported, save = {}, trainer.save_checkpoint

    def save_and_keep():
        exported.update(snapshot(out)) if trainer.state.step == 6 else None  # as the step-3 save left it
        return save()

    trainer.save_checkpoint = save_and_keep
    with pytest.raises(SystemExit) as stop:
        trainer.fit()
    assert stop.value.code == STORAGE_EXIT_CODE
    assert (out / "model.safetensors").read_bytes() == exported["model.safetensors"]
    assert not (out / "model.safetensors.tmp").exists()
    assert checkpoint_steps(out) == [3, 6]  # renamed before the export: complete, and the resume exports it
    resumed = make_trainer(out, resume=True)
    assert resumed.resumed_from == 6 and exported_is_latest(out)


def test_checkpoints_without_manifest_and_unloadable_ones(tmp_path, capsys):
    out = tmp_path / "run"
    make_trainer(out).fit()
    assert checkpoint_steps(out) == [3, 6]
    # As written before manifests existed: step 3 is intact and loads unchecked; step 6's optimiser state
    # is cut short, which only loading finds.
    for step in (3, 6):
        folder = out / "checkpoints" / f"step_{step}"
        (folder / "manifest.json").unlink()
        state = json.loads((folder / "trainer_state.json").read_text())
        del state["manifest"]
        (folder / "trainer_state.json").write_text(json.dumps(state))
    optimizer = out / "checkpoints" / "step_6" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    capsys.readouterr()
    resumed = make_trainer(out, resume=True)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert resumed.resumed_from == 3 and len(warnings) == 1 and "loading it failed" in warnings[0]
    assert checkpoint_steps(out) == [3] and (out / "checkpoints" / "step_6.damaged").is_dir()
    assert exported_is_latest(out)


def test_a_lost_manifest_is_damage_and_with_nothing_intact_resume_refuses(tmp_path, capsys):
    out = tmp_path / "run"
    make_trainer(out).fit()
    (out / "checkpoints" / "step_6" / "manifest.json").unlink()
    ema = out / "checkpoints" / "step_3" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:-10])  # truncated
    kept = snapshot(out)
    with pytest.raises(UserError, match=r"every checkpoint .* is damaged \(step_6: manifest.json: missing; "
                                        r"step_3: ema.safetensors: \d+ bytes, \d+ when saved\)"):
        make_trainer(out, resume=True)
    assert snapshot(out) == kept  # a user error changes no file


def records_of(out):
    """(step, split or event) of every metrics.jsonl line; every line must be whole JSON."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r.get("split") or r.get("event")) for r in map(json.loads, lines)]


def test_metrics_on_a_full_disk_are_held_then_the_checkpoint_stops_the_run(tmp_path, capsys):
    """From step 4 on metrics.jsonl cannot grow: training goes on with the records in memory and one
    warning; the checkpoint of step 6 must write them first, so it stops the run with one line and exit
    74, metrics.jsonl as the step-3 checkpoint left it (no half line); the resume completes the run."""
    ref_out = tmp_path / "ref"
    make_trainer(ref_out, log_every=1).fit()
    out = tmp_path / "run"
    trainer = make_trainer(out, log_every=1)
    trainer.faults = Faults(0, "enospc-metrics@4")
    with pytest.raises(SystemExit) as stop:
        trainer.fit()
    assert stop.value.code == STORAGE_EXIT_CODE
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: no space left on device")]
    assert len(warnings) == 1 and "metrics.jsonl" in warnings[0] and "step 4" in warnings[0]
    stopped = [line for line in err.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1 and "metrics.jsonl" in stopped[0] and "--resume" in stopped[0]
    assert checkpoint_steps(out) == [3]
    assert max(step for step, _ in records_of(out)) == 3  # whole lines only, up to the intact checkpoint
    make_trainer(out, resume=True, log_every=1).fit()  # space was freed
    assert records_of(out) == records_of(ref_out)


def test_metrics_held_on_a_full_disk_are_written_once_space_is_freed(tmp_path, capsys):
    ref_out = tmp_path / "ref"
    make_trainer(ref_out, log_every=1).fit()
    out = tmp_path / "run"
    trainer = make_trainer(out, log_every=1)
    trainer.faults = Faults(0, "enospc-metrics@4")
    save = trainer.save_checkpoint

    def free_space_then_save():
        if trainer.state.step == 6:
            assert trainer.metrics.pending  # held in memory, not lost
            trainer.faults = Faults(0, "")
        return save()

    trainer.save_checkpoint = free_space_then_save
    trainer.fit()
    assert checkpoint_steps(out) == [3, 6]
    assert records_of(out) == records_of(ref_out)
    assert sum(line.startswith("warning: no space") for line in capsys.readouterr().err.splitlines()) == 1


def test_a_full_disk_while_writing_samples_skips_them_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    trainer = make_trainer(out)
    calls = []

    def samples_on_a_full_disk(model, step, run_dir):
        calls.append(step)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run_dir / "samples" / f"step_{step}.png"))

    trainer.on_evaluate = samples_on_a_full_disk
    trainer.fit()
    assert trainer.state.step == 6 and calls == [3, 6]
    lines = [line for line in capsys.readouterr().err.splitlines() if "no samples written" in line]
    assert len(lines) == 2 and all(line.startswith("warning: no space left on device") for line in lines)


def test_a_full_disk_anywhere_in_a_script_is_one_line_and_exit_74(capsys):
    from shared.errors import DISK_FULL_EXIT_CODE, run_cli

    def main():
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/runs/x/config.json")

    with pytest.raises(SystemExit) as stop:
        run_cli(main)
    assert stop.value.code == DISK_FULL_EXIT_CODE == 74
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: disk quota exceeded (/runs/x/config.json)")

    def bug():
        raise OSError(errno.EACCES, "permission denied", "/x")

    with pytest.raises(PermissionError):  # other I/O errors are not hidden
        run_cli(bug)
