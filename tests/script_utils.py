"""Running the scripts as users do (subprocesses), on tiny local data, for the fault, multi-process and
bad-input tests."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
TORCHRUN = Path(sys.executable).with_name("torchrun")
TIMING_KEYS = ("steps_per_s", "examples_per_s")  # the only figures that may differ between runs


def script_env(**extra) -> dict:
    """The environment of a script run: one thread per process (two processes share a 2-core CI
    machine), no test hooks unless asked for."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIVA_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def script_command(script: str, *args) -> list[str]:
    return [sys.executable, str(SCRIPTS / script), *map(str, args)]


def run_script(script: str, *args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(script_command(script, *args), capture_output=True, text=True, cwd=ROOT,
                          env=env or script_env(), timeout=timeout)


def load_script(name: str):
    """scripts/<name>.py as a module, so that its main(argv) runs in-process (no second torch import)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(name: str, argv: list, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of scripts/<name>.py run in-process through run_cli, as from the shell."""
    from shared.errors import run_cli

    capsys.readouterr()
    code = 0
    try:
        run_cli(lambda: load_script(name).main([str(a) for a in argv]))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def torchrun_command(script: str, *args, nproc: int = 2) -> list[str]:
    return [str(TORCHRUN), "--nproc_per_node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), str(SCRIPTS / script), *map(str, args)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_folder(root: Path, n_train: int = 70, n_test: int = 16, size: int = 8, seed: int = 0,
                 classes: int = 0) -> Path:
    """Greyscale PNGs of random bars under root/train and root/test. 70 training images give 63 train
    and 7 validation images (the carving keeps a tenth): an odd validation set.

    With ``classes`` K > 0, image i goes to the class subfolder ``c<i % K>`` and its class decides the
    bar: horizontal for even classes, vertical for odd ones, at positions p with p % ceil(K/2) == c // 2."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            img = np.zeros((size, size), dtype=np.uint8)
            k = rng.integers(0, size)
            folder = root / split
            if classes:
                c, step = i % classes, -(-classes // 2)
                k = c // 2 + step * rng.integers(0, (size - 1 - c // 2) // step + 1)
                horizontal = c % 2 == 0
                folder = folder / f"c{c}"
                folder.mkdir(exist_ok=True)
            else:
                horizontal = rng.random() < 0.5
            if horizontal:
                img[k, :] = 255
            else:
                img[:, k] = 255
            Image.fromarray(img, "L").save(folder / f"{i:03d}.png")
    return root


WORDS = "the a cat dog sat on mat ran fast slow big small red blue house tree saw ate".split()


def text_files(root: Path, n_train: int = 400, n_valid: int = 31, n_test: int = 20, seed: int = 0) -> dict[str, Path]:
    """Short sentences over 18 words; 31 validation sentences (odd)."""
    rnd = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        lines = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 8))) for _ in range(n)]
        paths[name] = root / f"{name}.txt"
        paths[name].write_text("\n".join(lines) + "\n")
    return paths


def text_flags(files: dict[str, Path], cache: Path) -> list[str]:
    return ["--preset", "tiny", "--train-files", files["train"], "--valid-files", files["valid"],
            "--test-files", files["test"], "--vocab-size", "40", "--max-tokens", "10", "--cache-dir", cache]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def checkpoint_steps(run_dir: Path) -> list[int]:
    root = Path(run_dir) / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step_*")
                  if p.name[5:].isdigit() and (p / "trainer_state.json").is_file())  # not step_N.damaged
