"""Offline, hub datasets fail at once (shared/hub.py): with offline mode declared, or with the hub
endpoint unreachable, the training scripts stop within seconds with one line that names the dataset and
the local-data flag, instead of retrying the hub for half a minute. A copy in the datasets cache is used."""
from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from script_utils import ROOT, free_port, run_script, script_env

from shared import hub

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _env(tmp_path, mode: str) -> dict:
    """A script environment with an empty Hugging Face cache, offline by declaration or by a dead endpoint."""
    env = script_env(HF_HOME=tmp_path / "hf")
    for name in (*OFFLINE_VARS, "HF_ENDPOINT", "HF_DATASETS_CACHE"):
        env.pop(name, None)
    if mode == "declared":
        env["HF_HUB_OFFLINE"] = "1"
    else:  # nothing listens on a port that was just free: every connection is refused
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    return env


SCRIPTS = {
    "image": (["train_image.py", "--dataset", "cifar10"], "uoft-cs/cifar10", "--data-dir"),
    "text": (["train_text.py"], "rojagtap/bookcorpus", "--train-files"),
}


@pytest.mark.parametrize("mode", ["declared", "unreachable"])
@pytest.mark.parametrize("modality", ["image", "text"])
def test_hub_dataset_offline_fails_at_once_in_one_line(modality, mode, tmp_path):
    args, repo, flag = SCRIPTS[modality]
    out = tmp_path / "run"
    start = time.perf_counter()
    p = run_script(*args, "--output-dir", out, "--cache-dir", tmp_path / "cache", env=_env(tmp_path, mode), timeout=60)
    seconds = time.perf_counter() - start
    err = p.stderr.strip()
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and len(err.splitlines()) == 1, p.stderr
    assert err.startswith(f"error: could not fetch {repo}") and flag in err, err
    assert ("offline mode is on" if mode == "declared" else "unreachable") in err, err
    # The hub's retries take half a minute; a loaded 2-core machine needed 6.9 s for the fast path (a new
    # Python process importing the script): 15 s tells the two apart without failing on a busy machine.
    assert seconds < 15, f"{seconds:.1f} s: {err}"
    assert not out.exists()


def _prepare_cached_copy(home, repo_id: str) -> None:
    """What a first, online load_dataset(repo_id) leaves in the datasets cache, made from a local text
    file with the text builder and moved to the folder datasets falls back to for repo_id."""
    code = f"""
        import glob, json, os, pathlib, shutil
        import datasets
        text = pathlib.Path({str(home)!r}) / "lines.txt"
        text.write_text("".join(f"sentence number {{i}} .\\n" for i in range(50)))
        datasets.load_dataset("text", data_files={{"train": str(text)}}, split="train")
        pattern = str(datasets.config.HF_DATASETS_CACHE / "text" / "*" / "*" / "*")
        built = [p for p in glob.glob(pattern) if os.path.isdir(p)][0]
        name = "{repo_id.split('/')[1]}"
        copy = datasets.config.HF_DATASETS_CACHE / "{repo_id.replace('/', '___')}" / "default" / "0.0.0" / "0123abcd"
        shutil.copytree(built, copy)
        os.replace(copy / "text-train.arrow", copy / f"{{name}}-train.arrow")
        info = json.loads((copy / "dataset_info.json").read_text())
        (copy / "dataset_info.json").write_text(json.dumps({{**info, "config_name": "default"}}))
    """
    home.mkdir(parents=True)
    env = script_env(HF_HOME=home, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.fixture(scope="module")
def cached_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("cached") / "hf"
    _prepare_cached_copy(home, "someone/tiny-lines")
    return home


@pytest.mark.parametrize("mode", ["declared", "unreachable"])
def test_a_cached_copy_is_read_without_the_hub(mode, cached_home, tmp_path):
    """Offline with a copy in the datasets cache, the check lets load_dataset read it (streamed, as the
    text data are), at once: no retries first."""
    code = """
        import json, time, warnings
        start = time.perf_counter()
        from shared.hub import require_hub_dataset
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            require_hub_dataset("someone/tiny-lines", "pass local files")
        import datasets
        rows = list(datasets.load_dataset("someone/tiny-lines", split="train", streaming=True))
        print(json.dumps({"rows": len(rows), "first": rows[0]["text"], "seconds": time.perf_counter() - start,
                          "warnings": [str(w.message) for w in caught]}))
    """
    env = {**_env(tmp_path, mode), "HF_HOME": str(cached_home)}
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    # Under 20 s: the hub's retries would take half a minute; a busy 2-core machine needed 12 s here.
    assert result["rows"] == 50 and result["first"] == "sentence number 0 ." and result["seconds"] < 20, result
    if mode == "unreachable":  # said once, and datasets is switched to offline mode instead of retrying
        assert len(result["warnings"]) == 1 and "unreachable" in result["warnings"][0], result
        assert "someone/tiny-lines" in result["warnings"][0]
    else:
        assert result["warnings"] == []


def test_the_cache_folder_is_the_one_datasets_reads(tmp_path, monkeypatch):
    """shared.hub finds cached copies without importing datasets: its folder rule must be datasets' own."""
    import datasets.config
    from datasets.naming import camelcase_to_snakecase

    for name in ("cifar10", "TinyLines", "GATE-engine", "img_align_CelebA", "MNIST"):
        assert hub._snake(name) == camelcase_to_snakecase(name), name
    code = ("import datasets.config, shared.hub; print(datasets.config.HF_DATASETS_CACHE); "
            "print(shared.hub.datasets_cache_dir())")
    for extra in ({"XDG_CACHE_HOME": str(tmp_path / "xdg")}, {"HF_HOME": str(tmp_path / "home"),
                                                              "HF_DATASETS_CACHE": str(tmp_path / "ds")}):
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME")}
        p = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, cwd=ROOT, capture_output=True, text=True,
                           check=True)
        theirs, ours = p.stdout.split()
        assert theirs == ours, extra
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds"))
    assert hub.cached_dataset_dirs("Someone/TinyLines") == []
    prepared = tmp_path / "ds" / "Someone___tiny_lines" / "default" / "0.0.0" / "abc"  # datasets' folder for it
    prepared.mkdir(parents=True)
    assert hub.cached_dataset_dirs("Someone/TinyLines") == [str(prepared)]


def test_offline_is_declared_as_datasets_reads_it(monkeypatch):
    for name in OFFLINE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert hub.hub_offline() is None
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_offline() == "HF_HUB_OFFLINE"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # datasets: its own variable wins when set
    assert hub.hub_offline() is None
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "yes")
    assert hub.hub_offline() == "HF_DATASETS_OFFLINE"


class _Status(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_HEAD(self):  # noqa: N802
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,reachable", [(200, True), (404, True), (503, False)])
def test_the_probe_takes_any_answer_but_a_server_error(status, reachable, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # the suite runs offline
    handler = type("Handler", (_Status,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reason = hub.probe_hub.__wrapped__(f"http://127.0.0.1:{server.server_address[1]}", timeout=2.0)
    finally:
        server.shutdown()
        server.server_close()
    assert (reason is None) == reachable, reason
    if not reachable:
        assert "503" in reason


def test_the_probe_gives_up_on_a_silent_hub_within_its_timeout(monkeypatch):
    """A hub that accepts the connection and never answers (a black-holing proxy) costs the timeout
    once, not a retry loop."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        start = time.perf_counter()
        reason = hub.probe_hub.__wrapped__(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.5)
        seconds = time.perf_counter() - start
    assert reason is not None and seconds < 2.0, (reason, seconds)
