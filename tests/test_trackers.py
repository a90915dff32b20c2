"""Trackers (--report-to): TensorBoard gets exactly the numbers of metrics.jsonl at the same steps, the
evaluation samples and the config, also across a kill and --resume; --report-to none writes no event
file; a tracker that is not installed is one line at flag-parsing time; a tracker that fails does not
stop training or touch metrics.jsonl."""
from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
from core_utils import ArrayDataset, build, stripes, tiny_image_config, tiny_run
from script_utils import image_folder, metrics, run_script, script_env, text_files, text_flags, without_timing

from shared import tracking
from shared.engine import Trainer
from shared.run_dir import write_run_config

pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra: pip install -e '.[dev]'")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGE_FLAGS = ["--preset", "tiny", "--max-steps", 30, "--eval-every", 10, "--log-every", 5, "--save-every", 10,
               "--batch-size", 16]


def events(run_dir: Path, modality: str) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard" / f"biva-{modality}"),
                           size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def assert_scalars_match_metrics(acc: EventAccumulator, records: list[dict]) -> None:
    """Every number of every metrics.jsonl record is a TensorBoard scalar at the record's step, in order,
    and TensorBoard holds nothing else."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for tag, value in tracking.scalars(record).items():
            expected.setdefault(tag, []).append((record["step"], value))
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, want in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        for (_, g), (_, w) in zip(got, want):
            assert g == pytest.approx(w, rel=1e-6, abs=1e-6) or (math.isnan(g) and math.isnan(w)), (tag, g, w)


def hparams(acc: EventAccumulator) -> dict:
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    values = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in values.items()}


@pytest.mark.slow
def test_tensorboard_matches_metrics_across_a_kill_and_resume(tmp_path):
    data, run = image_folder(tmp_path / "data"), tmp_path / "run"
    flags = ["--data-dir", data, "--output-dir", run, "--cache-dir", tmp_path / "cache", *IMAGE_FLAGS]
    # Killed during the validation of step 20, after its record reached metrics.jsonl and TensorBoard:
    # the resume goes back to checkpoint 10, so TensorBoard must forget the first launch's step 20.
    killed = run_script("train_image.py", *flags, "--report-to", "tensorboard", env=script_env(BIVA_FAULTS="kill-eval@20"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_script("train_image.py", *flags, "--resume")  # keeps the run's tracker (config.json)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "warning" not in resumed.stderr

    assert len(list((run / "tensorboard" / "biva-image").glob("events.out.tfevents.*"))) == 2  # same folder
    acc = events(run, "image")
    records = metrics(run)
    assert_scalars_match_metrics(acc, records)
    tags = set(acc.Tags()["scalars"])
    assert {"train/elbo", "train/kl", "train/kl/group_0", "train/kl/group_4", "train/free_bits_budget", "train/lr",
            "train/grad_norm", "train/examples_per_s", "valid/elbo", "valid/kl/group_4", "valid/bits_per_dim"} <= tags
    assert [e.step for e in acc.Scalars("valid/elbo")] == [10, 20, 30]

    # One 8x8 grid of the 64 8x8 samples per evaluation, step 10 logged again by the resumed launch.
    valid_steps = [r["step"] for r in records if r.get("split") == "valid"]
    images = acc.Images("samples")
    assert [e.step for e in images] == valid_steps == [10, 20, 30]
    assert all((e.width, e.height) == (64, 64) for e in images)

    config = json.loads((run / "config.json").read_text())
    hp = hparams(acc)
    assert hp["train.report_to"] == config["train"]["report_to"] == "tensorboard"
    assert hp["train.lr"] == pytest.approx(config["train"]["lr"])
    assert hp["model.image_shape"] == "[1, 8, 8]" and hp["modality"] == "image"
    metric_tags = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/experiment"]).experiment.metric_infos
    assert "valid/elbo" in [m.name.tag for m in metric_tags]


@pytest.mark.slow
def test_text_run_logs_scalars_and_sample_sentences(tmp_path):
    files, run = text_files(tmp_path / "text"), tmp_path / "run"
    p = run_script("train_text.py", *text_flags(files, tmp_path / "cache"), "--output-dir", run, "--max-steps", 6,
                   "--eval-every", 3, "--log-every", 2, "--batch-size", 16, "--report-to", "tensorboard")
    assert p.returncode == 0, p.stderr[-2000:]
    acc = events(run, "text")
    assert_scalars_match_metrics(acc, metrics(run))
    assert "valid/nats_per_dim" in acc.Tags()["scalars"]
    texts = acc.Tensors("samples/text_summary")
    assert [e.step for e in texts] == [3, 6]
    for e in texts:
        shown = e.tensor_proto.string_val[0].decode()
        written = (run / "samples" / f"step_{e.step}.txt").read_text().splitlines()
        assert shown.splitlines() == ["    " + line for line in written]


@pytest.mark.slow
def test_report_to_none_writes_no_event_file(tmp_path):
    run = tmp_path / "run"
    p = run_script("train_image.py", "--data-dir", image_folder(tmp_path / "data"), "--output-dir", run,
                   "--cache-dir", tmp_path / "cache", "--preset", "tiny", "--max-steps", 3, "--eval-every", 3,
                   "--batch-size", 16, "--report-to", "none")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (run / "samples" / "step_0000003.png").is_file() and metrics(run)
    assert not (run / "tensorboard").exists() and not list(run.rglob("events.out.tfevents*"))
    assert json.loads((run / "config.json").read_text())["train"]["report_to"] == "none"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_missing_tracker_is_one_line_at_parse_time(tmp_path):
    run = tmp_path / "run"
    p = run_script("train_image.py", "--data-dir", tmp_path, "--output-dir", run, "--report-to", "wandb")
    assert p.returncode == 2
    assert p.stderr.strip() == ("error: --report-to wandb needs the wandb package, which is not installed: "
                                "pip install -e \".[wandb]\" (or pass --report-to none)")
    assert not run.exists()


def _train_image_module():
    spec = importlib.util.spec_from_file_location("script_train_image", ROOT / "scripts" / "train_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_default_is_tensorboard_only_when_installed(tmp_path, monkeypatch, capsys):
    parse = _train_image_module().parse_args
    argv = ["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "run")]
    assert parse(argv).report_to == "tensorboard"
    assert parse([*argv, "--report-to", "none"]).report_to == "none"
    monkeypatch.setattr(tracking, "installed", lambda name: False)
    assert parse(argv).report_to == "none"
    for choice in ("tensorboard", "all"):
        with pytest.raises(SystemExit) as exit_:
            parse([*argv, "--report-to", choice])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and 'pip install -e ".[tensorboard]"' in err, err


def _train(out: Path, report_to: str) -> list[dict]:
    run = tiny_run(tiny_image_config("biva"), max_steps=12, eval_every=4, save_every=12, log_every=2,
                   report_to=report_to)
    out.mkdir(parents=True)
    write_run_config(out, run)
    Trainer(run, build(tiny_image_config("biva")), ArrayDataset(stripes(64)), ArrayDataset(stripes(16, seed=1)),
            out).fit()
    return metrics(out)


def test_a_failing_tracker_is_reported_and_training_goes_on(tmp_path, monkeypatch, capsys):
    from accelerate.tracking import TensorBoardTracker

    calls = []

    def broken_log(self, values, step=None, **kwargs):
        calls.append(step)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(TensorBoardTracker, "log", broken_log)
    reference = _train(tmp_path / "reference", "none")
    capsys.readouterr()
    records = _train(tmp_path / "run", "tensorboard")
    warnings = re.findall(r"warning: .*", capsys.readouterr().err)
    assert len(calls) == 3  # dropped after its failure
    assert warnings == ["warning: the tensorboard tracker failed (OSError: [Errno 28] No space left on device); "
                        "it is off for the rest of this run, metrics.jsonl is complete"]
    assert without_timing(records) == without_timing(reference)


def test_a_tracker_that_cannot_start_is_reported_and_training_goes_on(tmp_path, monkeypatch, capsys):
    from accelerate.tracking import TensorBoardTracker

    def broken_start(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(TensorBoardTracker, "start", broken_start)
    reference = _train(tmp_path / "reference", "none")
    capsys.readouterr()
    records = _train(tmp_path / "run", "tensorboard")
    warnings = re.findall(r"warning: .*", capsys.readouterr().err)
    assert warnings == ["warning: could not start the trackers tensorboard (PermissionError: [Errno 13] Permission "
                        "denied); training goes on with metrics.jsonl only"]
    assert without_timing(records) == without_timing(reference)
