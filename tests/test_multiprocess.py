"""Two processes on the CPU (torchrun, gloo): every rank holds the same weights, EMA, free-bits budget
and data position; validation over an odd-sized set equals the single-process figure on the same
weights; a fault, a SIGTERM or the end of --max-minutes seen by one rank only is acted on by both at
the same update; and a checkpoint written by two processes resumes in one."""
import json
import re
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from script_utils import (ROOT, TORCHRUN, image_folder, metrics, run_script, script_env, text_files, text_flags,
                          torchrun_command)

from shared.evaluate import evaluate
from shared.run_dir import read_run_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun is not installed next to python")]


def torchrun(script, *args, env):
    return subprocess.run(torchrun_command(script, *args), capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)


def assert_ranks_agree(dump_dir, world=2):
    """The state each rank wrote through BIVA_DUMP_DIR is the same on every rank."""
    states = [json.loads((dump_dir / f"rank{r}.json").read_text()) for r in range(world)]
    tensors = [load_file(str(dump_dir / f"rank{r}.safetensors")) for r in range(world)]
    assert all(s["world"] == world for s in states)
    for r in range(1, world):
        assert states[r]["train"] == states[0]["train"]  # step, epoch, position in the epoch, skips
        assert states[r]["free_bits"] == states[0]["free_bits"]
        assert tensors[r].keys() == tensors[0].keys()
        assert any(k.startswith("ema/") for k in tensors[0])
        for k in tensors[0]:
            assert torch.equal(tensors[r][k], tensors[0][k]), k
    return states[0]


def test_image_two_processes_agree_and_resume_in_one(tmp_path):
    data = image_folder(tmp_path / "data")
    out, cache = tmp_path / "run", tmp_path / "cache"
    flags = ["--data-dir", data, "--cache-dir", cache, "--preset", "tiny", "--output-dir", out,
             "--max-steps", 12, "--batch-size", 8, "--eval-every", 3, "--save-every", 3, "--log-every", 2,
             # every validation lowers the free-bits budget: a decision both ranks must take alike
             "--free-bits-patience", 1, "--free-bits-threshold", 1000]
    # Rank 1 alone sees a NaN loss on the 4th update and a SIGTERM as the 9th starts.
    env = script_env(BIVA_FAULTS="nan-loss@4:1,sigterm@9:1", BIVA_DUMP_DIR=tmp_path / "dump")
    p = torchrun("train_image.py", *flags, env=env)
    assert p.returncode != 0, p.stderr[-3000:]
    said = re.findall(r"received SIGTERM: saved checkpoint (\S+) at step (\d+); resume with: (.*)", p.stderr)
    assert len(said) == 1, p.stderr[-3000:]  # from the main process only
    path, step, command = said[0]
    assert path.endswith("step_8") and step == "8"
    assert command.startswith("torchrun --nproc_per_node 2 ") and command.endswith(" --resume")
    assert f"--data-dir {data}" in command

    state = assert_ranks_agree(tmp_path / "dump")
    assert state["train"]["step"] == 8 and state["train"]["skipped_total"] == 1
    assert state["free_bits"]["budget"] == pytest.approx(1.25)  # 2.5 halved at the step-6 validation
    records = metrics(out)
    assert [r["step"] for r in records if r.get("event") == "skipped_update"] == [3]
    assert all(r["examples_per_s"] > 0 for r in records if r.get("split") == "train")

    # The two-process validation at step 6 covers the 7 validation images once each, and equals one
    # process's figure on the same EMA weights (with another batch size).
    valid = [r for r in records if r.get("split") == "valid"]
    assert [r["step"] for r in valid] == [3, 6] and valid[-1]["num_examples"] == 7
    run = read_run_config(out, "image")
    from biva_image.data import ImageDataset
    from biva_image.runs import load_image_model, load_split, run_data_config

    model = load_image_model(out, run)
    model.load_state_dict(load_file(str(out / "checkpoints" / "step_6" / "ema.safetensors")))
    images = load_split(run_data_config(run), "valid").images
    single = evaluate(model, ImageDataset(images), batch_size=3, seed=run.train.eval_seed, progress=False)
    assert single.num_examples == 7
    assert single.elbo == pytest.approx(valid[-1]["elbo"], abs=1e-4)
    assert single.kl_per_group == pytest.approx(valid[-1]["kl_per_group"], abs=1e-4)

    # One process continues the two-process checkpoint to the end.
    p = run_script("train_image.py", *flags, "--resume", env=script_env(BIVA_DUMP_DIR=tmp_path / "dump1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'step_8'} (step 8)" in p.stderr
    state = json.loads((tmp_path / "dump1" / "rank0.json").read_text())
    assert state["world"] == 1 and state["train"]["step"] == 12
    assert state["free_bits"]["budget"] == 1.0  # 1.25 lowered again after the resume, to the floor (--free-bits-min 1)
    records = metrics(out)
    assert [r["step"] for r in records if r.get("split") == "valid"] == [3, 6, 9, 12]
    assert [r["step"] for r in records if r.get("split") == "train"] == [2, 4, 6, 8, 10, 12]


def test_text_two_processes_agree(tmp_path):
    files = text_files(tmp_path / "text")
    out = tmp_path / "run"
    flags = [*text_flags(files, tmp_path / "cache"), "--output-dir", out, "--max-steps", 10, "--batch-size", 8,
             "--eval-every", 4, "--save-every", 5, "--free-bits-patience", 1, "--free-bits-threshold", 1000,
             "--eval-examples", 25,  # a seeded subset of the 31: every rank must draw the same one
             "--max-minutes", 1000]
    # Rank 1 alone sees a NaN in its (already synchronised) gradient on the 3rd update, and its clock
    # alone finds --max-minutes used up from the 9th update on (step 8): both ranks end the run there.
    env = script_env(BIVA_FAULTS="nan-grad@3:1,out-of-time@9:1", BIVA_DUMP_DIR=tmp_path / "dump")
    p = torchrun("train_text.py", *flags, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count("--max-minutes 1000: the time was used up at step 8") == 1  # the main process says it
    state = assert_ranks_agree(tmp_path / "dump")
    assert state["train"]["step"] == 8 and state["train"]["skipped_total"] == 1
    assert state["free_bits"]["budget"] < 2.0
    records = metrics(out)
    assert [r["step"] for r in records if r.get("event") == "skipped_update"] == [2]

    valid = [r for r in records if r.get("split") == "valid"]
    assert [r["step"] for r in valid] == [4, 8] and valid[-1]["num_examples"] == 25
    from biva_text.data import TextDataset
    from biva_text.report import load_text_run, load_text_split

    run, model, _ = load_text_run(out)  # the exported EMA weights of step 8
    split = load_text_split(run, out, "valid")
    single = evaluate(model, TextDataset(split), batch_size=5, seed=run.train.eval_seed, max_examples=25,
                      progress=False)
    assert single.num_examples == 25 and single.subset["of"] == 31
    assert single.elbo == pytest.approx(valid[-1]["elbo"], abs=1e-4)
    assert single.kl_per_group == pytest.approx(valid[-1]["kl_per_group"], abs=1e-4)
