"""The image scripts end to end on the tiny preset: train on an image folder made here, then sample,
reconstruct, report (bounds, KL per group, active units, anomaly curve) and compare; bad input is one
line and exit status 2. One trained run is shared by the module; everything stays on the CPU, offline."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from script_utils import load_script

from biva_image.anomaly import auroc
from biva_image.model import ImageModelConfig, ImageVAE
from shared.config import from_dict
from shared.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SIZE = 8
AUTO = 8  # the default grid scale of 8-pixel images: each shown 64 pixels wide (MIN_TILE_PX)


train_image, sample_image, reconstruct_image, report_image, compare_image = (
    load_script(n) for n in ("train_image", "sample_image", "reconstruct_image", "report_image", "compare_image"))


def _bars(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    """Grey (N, size, size) images: a bright bar (row or column) over a dark noisy background."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 40, (n, size, size))
    for i in range(n):
        k = rng.integers(0, size)
        if rng.random() < 0.5:
            x[i, k, :] += 180
        else:
            x[i, :, k] += 180
    return x.clip(0, 255).astype(np.uint8)


def _write_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    data = root / "data"
    _write_folder(data / "train", _bars(320, seed=0))
    _write_folder(data / "test", _bars(48, seed=1))
    # OOD: uniform noise, which the model should find far less likely than bars.
    ood = _write_folder(root / "ood", np.random.default_rng(2).integers(0, 256, (40, SIZE, SIZE)).astype(np.uint8))
    run = root / "run"
    train_image.main(["--data-dir", str(data), "--preset", "tiny", "--output-dir", str(run), "--max-steps", "40",
                      "--eval-every", "20", "--save-every", "40", "--batch-size", "16",
                      "--cache-dir", str(root / "cache")])
    return {"root": root, "data": data, "ood": ood, "run": run}


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def _grid_side(n: int, size: int = SIZE, pad: int = 1) -> int:
    return n * (size + pad) + pad


def test_training_writes_a_sample_grid_every_evaluation(world):
    grids = sorted((world["run"] / "samples").glob("step_*.png"))
    assert [p.name for p in grids] == ["step_0000020.png", "step_0000040.png"]
    assert (world["run"] / "model.safetensors").is_file()
    assert _png_size(grids[0]) == (_grid_side(8) * AUTO,) * 2  # 64 samples, enlarged like sample_image's


def test_grids_are_enlarged_by_repeating_pixels(world, tmp_path):
    """--scale N repeats every pixel of the native grid N times (nearest neighbour, nothing blurred);
    the default, auto, enlarges 8-pixel images 8 times."""
    run = str(world["run"])
    paths = {scale: sample_image.main(["--run", run, "--num", "16", "--out", str(tmp_path / f"s{scale}.png"),
                                       "--scale", scale]) for scale in ("1", "3", "auto")}
    native = np.asarray(Image.open(paths["1"]))
    assert native.shape == (_grid_side(4), _grid_side(4))
    for scale, factor in (("3", 3), ("auto", AUTO)):
        big = np.asarray(Image.open(paths[scale]))
        assert big.shape == (native.shape[0] * factor, native.shape[1] * factor)
        assert np.array_equal(big, native.repeat(factor, axis=0).repeat(factor, axis=1))
        assert np.array_equal(big[::factor, ::factor], native)
    recon = {scale: np.asarray(Image.open(reconstruct_image.main(
        ["--run", run, "--num", "4", "--out", str(tmp_path / f"r{scale}.png"), "--scale", scale])))
        for scale in ("1", "2")}
    assert np.array_equal(recon["2"], recon["1"].repeat(2, axis=0).repeat(2, axis=1))


def test_sample_image_writes_a_seeded_grid(world, tmp_path):
    run = str(world["run"])
    a = sample_image.main(["--run", run, "--num", "12", "--out", str(tmp_path / "a.png"), "--seed", "3"])
    b = sample_image.main(["--run", run, "--num", "12", "--out", str(tmp_path / "b.png"), "--seed", "3",
                           "--batch-size", "5"])
    c = sample_image.main(["--run", run, "--num", "12", "--out", str(tmp_path / "c.png"), "--seed", "4"])
    mean = sample_image.main(["--run", run, "--num", "12", "--out", str(tmp_path / "m.png"), "--output", "mean",
                              "--latent-temperature", "0.5", "--ncol", "6", "--scale", "1"])
    assert _png_size(a) == (_grid_side(4) * AUTO, _grid_side(3) * AUTO)  # 12 images: 4 per row, 3 rows
    assert _png_size(mean) == (_grid_side(6), _grid_side(2))
    pixels = {p: np.asarray(Image.open(p)) for p in (a, b, c)}
    assert np.array_equal(pixels[a], pixels[b])  # same seed: same draws, whatever the batching
    assert not np.array_equal(pixels[a], pixels[c])


def test_reconstruct_image_puts_inputs_above_reconstructions(world, tmp_path):
    out = reconstruct_image.main(["--run", str(world["run"]), "--num", "6", "--out", str(tmp_path / "r.png"),
                                  "--from-level", "0", "2", "--split", "test", "--scale", "1"])
    grid = np.asarray(Image.open(out))
    assert grid.shape == (_grid_side(3), _grid_side(6))  # inputs, k = 0, k = 2; six columns
    test_images = _bars(48, seed=1)
    for i in range(6):  # the first row is the test split in its on-disk order
        y, x = 1, 1 + i * (SIZE + 1)
        assert np.array_equal(grid[y:y + SIZE, x:x + SIZE], test_images[i])


@pytest.fixture(scope="module")
def report(world):
    json_copy = world["root"] / "out" / "report.json"
    result = report_image.main(["--run", str(world["run"]), "--iw-samples", "30", "--ood-data-dir", str(world["ood"]),
                                "--json", str(json_copy), "--batch-size", "16"])
    return result, json_copy


def test_report_json_has_the_contract_keys_with_finite_values(world, report):
    result, json_copy = report
    saved = json.loads((world["run"] / "report-test.json").read_text())
    assert saved == json.loads(json_copy.read_text()) == json.loads(json.dumps(result))
    for key in ("num_params", "iw_samples", "nats_elbo", "nats_iw", "bits_per_dim_elbo", "bits_per_dim_iw"):
        assert isinstance(saved[key], (int, float)) and math.isfinite(saved[key]), key
    assert saved["iw_samples"] == 30 and saved["num_examples"] == 48
    config = json.loads((world["run"] / "config.json").read_text())["model"]
    model = ImageVAE(from_dict(ImageModelConfig, config))
    assert saved["num_params"] == sum(p.numel() for p in model.parameters())
    # bits/dim = nats / (D ln 2) with D = 64 sub-pixels
    assert saved["bits_per_dim_elbo"] == pytest.approx(saved["nats_elbo"] / (64 * math.log(2)))
    # L_K >= L_1 in expectation: the IW bound is the lower (better) bits/dim, up to noise.
    assert saved["bits_per_dim_iw"] <= saved["bits_per_dim_elbo"] + 1e-3
    groups = saved["kl_per_group"]
    assert [(g["level"], g["kind"]) for g in groups] == [(3, "top"), (2, "bu"), (2, "td"), (1, "bu"), (1, "td")]
    assert all(math.isfinite(g["kl"]) for g in groups)
    assert sum(g["kl"] for g in groups) == pytest.approx(saved["kl"])
    au = saved["active_units"]
    assert len(au["per_group"]) == 5 and au["total"] == sum(au["per_group"])
    assert (world["run"] / "report-test-kl.png").is_file() and (world["run"] / "report-test-anomaly.png").is_file()
    # which weights, noise and examples produced the figures
    assert saved["weights"] == "ema" and saved["step"] == 40 and saved["noise_seed"] == saved["seed"] == 0
    assert saved["subset"] is None and saved["ood_subset"] is None  # whole test split, whole OOD folder


def test_report_anomaly_rows(report):
    result, _ = report
    rows = result["anomaly"]
    assert [r["k"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert set(r) == {"k", "iw_samples", "bpd_in", "bpd_ood", "auroc", "kl_per_group"} and r["iw_samples"] == 1
        assert 0.0 <= r["auroc"] <= 1.0 and math.isfinite(r["bpd_in"]) and math.isfinite(r["bpd_ood"])
        # L^{>k} infers only the groups of levels > k; the ones below come from the prior and have no KL
        assert [g["level"] for g in r["kl_per_group"]] == [g["level"] for g in result["kl_per_group"]
                                                         if g["level"] > r["k"]]
    assert rows[0]["kl_per_group"] == result["kl_per_group"]  # L^{>0} is the ELBO
    # L^{>0} with one sample is the ELBO, on the same noise.
    assert rows[0]["bpd_in"] == pytest.approx(result["bits_per_dim_elbo"], abs=1e-9)
    # Uniform noise is far less likely than the bars the model was trained on.
    assert rows[0]["bpd_ood"] > rows[0]["bpd_in"] and rows[0]["auroc"] > 0.9


def test_report_numbers_do_not_depend_on_the_batch_size(world, tmp_path):
    kw = ["--run", str(world["run"]), "--iw-samples", "4", "--max-examples", "20", "--split", "valid"]
    a = report_image.main(kw + ["--batch-size", "20"])
    b = report_image.main(kw + ["--batch-size", "3", "--iw-chunk", "3"])
    for key in ("nats_elbo", "nats_iw", "kl"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key
    assert a["num_examples"] == 20 and (world["run"] / "report-valid.json").is_file()
    # a seeded draw of 20 validation images (the folder has no classes: not stratified)
    assert a["subset"] == b["subset"] and a["subset"]["size"] == 20 and a["subset"]["of"] > 20
    assert a["subset"]["seed"] == 0 and a["subset"]["stratified"] is False


@pytest.mark.slow
def test_compiled_report_equals_eager(world, capsys, monkeypatch):
    """--compile runs the bounds' forward passes through torch.compile: the same figures, recorded in the
    report, with the time it took. Dynamo traces the passes here, AOT autograd's eager backend runs
    them (inductor's code generation takes minutes on two cores; test_compile.py checks its numbers)."""
    import functools

    import torch

    kw = ["--run", str(world["run"]), "--iw-samples", "4", "--iw-chunk", "2", "--max-examples", "6",
          "--batch-size", "3", "--split", "valid", "--device", "cpu"]
    eager = report_image.main(kw)
    calls, compile_ = [], functools.partial(torch.compile, backend="aot_eager")

    def traced(model, **options):
        calls.append(model)
        return compile_(model, **options)

    monkeypatch.setattr(torch, "compile", traced)
    try:
        compiled = report_image.main(kw + ["--compile"])
    finally:
        torch._dynamo.reset()
    assert len(calls) == 1 and eager["compiled"] is False and compiled["compiled"] is True
    for key in ("nats_elbo", "nats_iw", "kl"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-5), key
    assert [g["kl"] for g in compiled["kl_per_group"]] == pytest.approx([g["kl"] for g in eager["kl_per_group"]],
                                                                       rel=1e-5, abs=1e-5)
    assert "--compile: the evaluation took" in capsys.readouterr().err


def test_compare_image_table_and_plot(world, report, tmp_path):
    other = tmp_path / "lvae-copy"
    shutil.copytree(world["run"], other)
    changed = json.loads((other / "report-test.json").read_text())
    changed.update(model="lvae", bits_per_dim_elbo=9.875)
    (other / "report-test.json").write_text(json.dumps(changed))
    table = compare_image.main([str(world["run"]), str(other), "--out", str(tmp_path / "t.md"),
                                "--plot", str(tmp_path / "kl.png")])
    rows = table.splitlines()[2:]
    assert len(rows) == 2 and rows[0].startswith("| run | biva |") and rows[1].startswith("| lvae-copy | lvae |")
    assert f"| {report[0]['bits_per_dim_elbo']:.3f} |" in rows[0] and "| 9.875 |" in rows[1]
    assert (tmp_path / "t.md").read_text().strip() == table
    assert _png_size(tmp_path / "kl.png")[0] > 100


def test_auroc_is_rank_based_with_ties():
    assert auroc([1, 2, 3], [4, 5, 6]) == 1.0
    assert auroc([4, 5, 6], [1, 2, 3]) == 0.0
    assert auroc([1, 1], [1, 1, 1]) == 0.5  # all tied: chance
    # P(pos > neg) + P(tie)/2 by hand, pos 2 against neg 1, 2, 3, then pos 3 against them
    assert auroc([1, 2, 3], [2, 3]) == pytest.approx((1 + 0.5 + 0 + 1 + 1 + 0.5) / 6)
    rng = np.random.default_rng(0)
    neg, pos = rng.integers(0, 5, 200), rng.integers(1, 6, 150)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auroc(neg, pos) == pytest.approx(brute)


# ------------------------------------------------------------------------------------------- errors


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_a_text_run_is_refused_in_one_line(tmp_path):
    text_run = tmp_path / "text-run"
    text_run.mkdir()
    (text_run / "config.json").write_text(json.dumps({"modality": "text", "preset": "bookcorpus", "model": {},
                                                      "data": {}}))
    for script, args in (("sample_image.py", ["--run", str(text_run)]),
                         ("report_image.py", ["--run", str(text_run)]),
                         ("compare_image.py", [str(text_run)])):
        done = _cli(script, *args)
        assert done.returncode == 2, (script, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, (script, lines)
    assert "is a text run, not an image run" in _cli("sample_image.py", "--run", str(text_run)).stderr
    assert "report_image.py" in _cli("compare_image.py", str(text_run)).stderr


def test_bad_flags_exit_2(world, tmp_path):
    for argv in (["--run", str(world["run"]), "--ood-dataset", "imagenet-21k"],
                 ["--run", str(world["run"]), "--iw-samples", "-3"],
                 ["--run", str(world["run"]), "--ood-k", "1"]):  # --ood-k without an OOD set
        with pytest.raises(SystemExit) as exit_info:
            report_image.main(argv)
        assert exit_info.value.code == 2
    with pytest.raises(UserError, match="not a run directory"):
        sample_image.main(["--run", str(tmp_path)])
    with pytest.raises(UserError, match="out of range"):
        reconstruct_image.main(["--run", str(world["run"]), "--from-level", "3"])
    with pytest.raises(UserError, match="out of range"):
        report_image.main(["--run", str(world["run"]), "--ood-data-dir", str(world["ood"]), "--ood-k", "7"])


def test_bad_data_is_one_sentence_and_writes_nothing(world, tmp_path):
    run = str(world["run"])
    before = (world["run"] / "report-test.json").read_bytes() if (world["run"] / "report-test.json").exists() else None
    wrong_size = _write_folder(tmp_path / "big", _bars(12, seed=5, size=16))
    with pytest.raises(UserError, match="16x16x1 images but the model takes 8x8x1"):
        report_image.main(["--run", run, "--ood-data-dir", str(wrong_size), "--iw-samples", "2"])
    with pytest.raises(UserError, match="16x16x1 images but the model takes 8x8x1"):
        reconstruct_image.main(["--run", run, "--data-dir", str(wrong_size), "--split", "train"])
    mixed = _write_folder(tmp_path / "mixed", _bars(3, seed=6))
    Image.fromarray(_bars(1, seed=7, size=12)[0]).save(mixed / "odd.png")
    with pytest.raises(UserError):
        report_image.main(["--run", run, "--ood-data-dir", str(mixed), "--iw-samples", "2"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        report_image.main(["--run", run, "--ood-data-dir", str(empty), "--iw-samples", "2"])
    flat = _write_folder(tmp_path / "flat", _bars(30, seed=8))  # no test/ subfolder
    with pytest.raises(UserError, match="no test split.*--split valid"):
        report_image.main(["--run", run, "--data-dir", str(flat)])
    after = (world["run"] / "report-test.json").read_bytes() if (world["run"] / "report-test.json").exists() else None
    assert before == after


def _noise_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE)).astype(np.uint8)


@pytest.mark.parametrize("layout", ["test-folder", "test-link"])
def test_an_ood_folder_of_only_test_is_scored(world, tmp_path, layout):
    """What an OOD set usually is: a folder with only test/, or a test/ that is a symbolic link to the
    images; every image of it is scored."""
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)  # the shared run's own reports stay as the other tests left them
    ood = tmp_path / "ood"
    if layout == "test-folder":
        _write_folder(ood / "test", _noise_images(12, seed=3))
    else:
        _write_folder(tmp_path / "noise-pngs", _noise_images(12, seed=3))
        ood.mkdir()
        (ood / "test").symlink_to(tmp_path / "noise-pngs", target_is_directory=True)
    for extra in ([], ["--ood-split", "test"]):
        result = report_image.main(["--run", str(run), "--iw-samples", "0", "--ood-data-dir", str(ood),
                                    "--ood-k", "0", *extra])
        assert result["ood"] == f"test split of {ood}" and result["ood_subset"] is None
        assert result["anomaly"][0]["auroc"] > 0.9  # uniform noise against bars, as with the flat OOD folder
    with pytest.raises(UserError, match="has no valid split"):  # a split the folder lacks, asked for
        report_image.main(["--run", str(run), "--iw-samples", "0", "--ood-data-dir", str(ood), "--ood-split", "valid"])


def test_the_ood_set_goes_through_the_in_distribution_preprocessing(world, tmp_path):
    """The OOD set becomes the uint8 (N, C, H, W) arrays the run's own data become (dtype, shape, pixels),
    and the model binarises it as it binarises them: an OOD folder holding the in-distribution test
    images scores exactly as the test split does under a (dynamically binarised) Bernoulli run."""
    from biva_image.runs import load_ood, load_split, run_data_config
    from shared.run_dir import read_run_config

    run = tmp_path / "bernoulli"
    train_image.main(["--data-dir", str(world["data"]), "--preset", "tiny", "--likelihood", "bernoulli",
                      "--output-dir", str(run), "--max-steps", "2", "--eval-every", "2", "--save-every", "2",
                      "--batch-size", "16", "--cache-dir", str(world["root"] / "cache")])
    config = read_run_config(run, "image")
    assert config.model["likelihood"] == "bernoulli" and config.model["binarize"] == "dynamic"
    ood = tmp_path / "ood"
    shutil.copytree(world["data"] / "test", ood / "test")
    data, od = load_split(run_data_config(config), "test"), load_ood(config, "test", data_dir=ood)
    assert od.images.dtype == data.images.dtype == np.uint8
    assert od.images.shape == data.images.shape == (48, *config.model["image_shape"])
    np.testing.assert_array_equal(od.images, data.images)
    report = report_image.main(["--run", str(run), "--iw-samples", "0", "--ood-data-dir", str(ood)])
    for row in report["anomaly"]:  # the same binarised inputs, the same noise: the same scores
        assert row["bpd_ood"] == row["bpd_in"] and row["auroc"] == 0.5, row


def test_offline_ood_hub_set_names_ood_data_dir(world, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub (offline mode is enabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as err:
        report_image.main(["--run", str(world["run"]), "--ood-dataset", "svhn", "--iw-samples", "2"])
    message = str(err.value)
    assert "could not fetch ufldl-stanford/svhn" in message and "--ood-data-dir" in message
    assert "\n" not in message


def test_a_recorded_relative_data_folder_that_moved_asks_for_data_dir(world, tmp_path):
    moved = tmp_path / "moved-run"
    shutil.copytree(world["run"], moved)
    config = json.loads((moved / "config.json").read_text())
    # as saved by a run started with a relative --data-dir elsewhere (a name no checkout holds: a user's
    # own data/ folder beside the tests must not make the recorded path resolve)
    config["data"]["data_dir"] = "data-of-a-run-started-elsewhere"
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="recorded image folder data-of-a-run-started-elsewhere .*pass --data-dir"):
        reconstruct_image.main(["--run", str(moved), "--split", "test"])
    out = reconstruct_image.main(["--run", str(moved), "--split", "test", "--data-dir", str(world["data"]),
                                  "--num", "2", "--out", str(tmp_path / "r.png")])
    assert out.is_file()


# --------------------------------------------------------------------------------------- benchmarks


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_benchmark_prints_one_json_line(capsys):
    result = _benchmark("image_throughput").main(["--preset", "tiny", "--device", "cpu", "--batch-size", "8",
                                                  "--steps", "2", "--warmup", "1", "--iw-samples", "6",
                                                  "--iw-chunk", "4", "--eval-batch-size", "2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(result))
    assert result["train_images_per_s"] > 0 and result["eval_images_per_s"] > 0 and result["eval_bound_finite"]
    assert result["peak_rss_gib"] > 0 and result["num_params"] == 45698 and result["device"] == "cpu"


def test_histogram_baseline_of_the_quality_benchmark():
    hist = _benchmark("image_quality").histogram_bits_per_dim
    train = np.zeros((6, 1, 2, 2), np.uint8)
    train[:3] = 7
    # Every position saw 3 x 0 and 3 x 7 among 6 images: p(0) = (3 + 1) / (6 + 256) with add-one smoothing.
    expected_seen = -math.log2(4 / 262)
    assert hist(train, np.zeros((2, 1, 2, 2), np.uint8)) == pytest.approx(expected_seen)
    assert hist(train, np.full((1, 1, 2, 2), 200, np.uint8)) == pytest.approx(-math.log2(1 / 262))


def test_no_channels_last_is_recorded_and_turns_the_layout_off(world, tmp_path, monkeypatch):
    """Training runs 2-D feature maps channels_last by default; --no-channels-last is saved in
    config.json and reaches the model the engine trains."""
    assert json.loads((world["run"] / "config.json").read_text())["train"]["channels_last"] is True
    import shared.engine as engine

    seen = []
    original = engine.Trainer.__init__

    def spy(self, run, build_model, *a, **k):
        model = build_model()
        seen.append([m.channels_last for m in model.modules() if hasattr(m, "channels_last") and m.ndim == 2])
        original(self, run, build_model, *a, **k)

    monkeypatch.setattr(engine.Trainer, "__init__", spy)
    run = tmp_path / "nhwc-off"
    train_image.main(["--data-dir", str(world["data"]), "--preset", "tiny", "--output-dir", str(run),
                      "--max-steps", "2", "--eval-every", "2", "--save-every", "2", "--batch-size", "16",
                      "--no-channels-last", "--cache-dir", str(world["root"] / "cache")])
    assert json.loads((run / "config.json").read_text())["train"]["channels_last"] is False
    assert seen and seen[0] and not any(seen[0])


def test_op_times_profile_times_each_operator_of_the_training_step(capsys):
    """profile_step.py --op-times: one row per aten operator of the step (backward ones included),
    with calls and milliseconds per step; refused without --device cpu."""
    bench = _benchmark("profile_step")
    bench.main(["--what", "image", "--preset", "tiny", "--device", "cpu", "--batch-size", "4", "--steps", "2",
                "--warmup", "1", "--op-times", "--rows", "200"])
    out = capsys.readouterr().out
    header, table = out.split("\noperator ", 1)
    assert "ms per step (2 steps)" in header and "operator calls per step" in header
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:] if line.strip()}
    assert {"convolution", "convolution_backward", "_weight_norm_interface"} <= set(rows)
    assert rows["convolution"][0] == rows["convolution_backward"][0]  # every convolution runs backward once
    assert all(float(ms) >= 0 and share.endswith("%") for _, ms, share in rows.values())
    with pytest.raises(SystemExit):
        bench.main(["--what", "image", "--op-times"])
    assert "--op-times times operators on the CPU" in capsys.readouterr().err


def _idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzipped IDX file, the format of the MNIST / Fashion-MNIST releases."""
    import gzip
    import struct

    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_semi_supervised_benchmark_reads_fashion_mnist_idx_files_into_a_class_folder(tmp_path):
    bench = _benchmark("semi_supervised")
    source = tmp_path / "idx"
    source.mkdir()
    rng = np.random.default_rng(0)
    data = {}
    for stem, n in (("train", 30), ("t10k", 20)):
        images, labels = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), np.arange(n) % 10
        _idx(source / f"{stem}-images-idx3-ubyte.gz", images)
        _idx(source / f"{stem}-labels-idx1-ubyte.gz", labels)
        data[stem] = (images, labels)
    assert np.array_equal(bench.read_idx(source / "t10k-images-idx3-ubyte.gz"), data["t10k"][0])
    folder = bench.write_fashion_folder(tmp_path / "fashion", source)
    for split, stem in (("train", "train"), ("test", "t10k")):
        classes = sorted(p.name for p in (folder / split).iterdir())
        assert classes == [f"{c}-{name}" for c, name in enumerate(bench.FASHION_CLASSES)]
        images, labels = data[stem]
        for i in (0, 7):
            png = folder / split / f"{labels[i]}-{bench.FASHION_CLASSES[labels[i]]}" / f"{i:05d}.png"
            assert np.array_equal(np.asarray(Image.open(png)), images[i])
        assert sum(1 for _ in (folder / split).rglob("*.png")) == len(labels)
    import gzip

    with gzip.open(source / "bad.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00")  # float IDX: refused
    with pytest.raises(SystemExit, match="not an IDX file of unsigned bytes"):
        bench.read_idx(source / "bad.gz")


def test_semi_supervised_benchmark_pairs_the_draws():
    """The paired view: per draw BIVA minus the classifier alone, and the draws where BIVA is lower."""
    paired = _benchmark("semi_supervised").paired_difference([0.3108, 0.3231, 0.3009], [0.3349, 0.3109, 0.3144])
    assert paired["per_draw"] == pytest.approx([-0.0241, 0.0122, -0.0135])
    assert paired["mean"] == pytest.approx(-0.00847, abs=1e-5) and paired["biva_lower"] == 2
    assert paired["std"] == pytest.approx(np.std([-0.0241, 0.0122, -0.0135], ddof=1))
