"""A trained run as a self-contained model folder, the way models are shared on the Hugging Face Hub.

The folder holds what the sampling and report scripts read (``config.json``, ``model.safetensors``,
``tokenizer.model`` for text), the run's reports, and a model card ``README.md`` with YAML front matter
and the reports' numbers. No checkpoints and no metrics: they are for resuming, not for using. The
folder is built under a temporary name beside its destination and renamed into place, so a failed
export leaves nothing half-written.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from .errors import UserError

CARD = "README.md"

# Report columns of the model card per modality: (header, report key, format). docs/reference.md lists the keys.
CARD_COLUMNS = {
    "image": [("bits/dim ELBO", "bits_per_dim_elbo", ".4f"), ("bits/dim L_K", "bits_per_dim_iw", ".4f"),
              ("nats ELBO", "nats_elbo", ".3f"), ("nats L_K", "nats_iw", ".3f"), ("K", "iw_samples", "d")],
    "text": [("NLL (L_1)", "nll_elbo", ".3f"), ("NLL (L_K)", "nll_iw", ".3f"), ("KL", "kl", ".3f"),
             ("PPL (L_1)", "ppl_elbo", ".2f"), ("PPL (L_K)", "ppl", ".2f"), ("K", "iw_samples", "d"),
             ("sentences", "num_sentences", "d")],
}
UNITS = {"image": "Likelihoods are positive negative log-likelihoods, lower is better: bits per sub-pixel and "
                  "nats per image; ELBO is L_1, L_K the importance-weighted bound with K samples.",
         "text": "Negative log-likelihoods in nats per sentence, lower is better; L_1 is the ELBO (the paper's "
                 "Table 7), L_K the importance-weighted bound with K samples; perplexity = exp(sum NLL / sum "
                 "tokens), tokens counting end-of-sentence."}


def check_destination(dest: Path, source: Path, overwrite: bool) -> None:
    """Refuse, before anything is read or written, a destination that cannot take the export."""
    if dest.resolve() == source.resolve() or source.resolve() in dest.resolve().parents:
        raise UserError(f"--to {dest} is the run directory or inside it; choose a folder outside {source}")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--to {dest} is a file; choose a folder")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise UserError(f"--to {dest} exists and is not empty; choose another folder or pass --overwrite")


def write_folder_atomic(dest: Path, fill: Callable[[Path], None]) -> None:
    """``fill(tmp)`` writes the folder's files into a temporary folder beside ``dest``, which then
    replaces ``dest`` (an old ``dest`` is moved aside first and removed only once the new one is in place)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = dest.with_name(f".{dest.name}.tmp-{tag}")
    old = dest.with_name(f".{dest.name}.old-{tag}")
    try:
        tmp.mkdir()
        fill(tmp)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dest.exists():
            os.replace(old, dest)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fmt(value, spec: str) -> str:
    if value is None:
        return "–"
    return format(value, spec)


def model_card(*, title: str, modality: str, facts: dict[str, str], reports: dict[str, dict],
               front_matter: dict[str, object], usage: list[str]) -> str:
    """The README.md of an exported folder: Hugging Face YAML front matter, what the model is, the
    reports' numbers (one row per split) and how to load it with this project's scripts."""
    lines = ["---"]
    for key, value in front_matter.items():
        if isinstance(value, list):
            if value:
                lines.append(f"{key}:")
                lines += [f"- {v}" for v in value]
        elif value is not None:
            lines.append(f"{key}: {value}")
    lines += ["---", "", f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in facts.items()]
    lines += ["", "## Evaluation", ""]
    if reports:
        cols = CARD_COLUMNS[modality]
        lines.append("| split | step | " + " | ".join(h for h, _, _ in cols) + " |")
        lines.append("|---|---|" + "---|" * len(cols))
        for split, r in reports.items():
            lines.append(f"| {split} | {_fmt(r.get('step'), 'd')} | "
                         + " | ".join(_fmt(r.get(key), spec) for _, key, spec in cols) + " |")
        lines += ["", UNITS[modality], "The reports themselves are the `report-<split>.json` files of this folder."]
    else:
        lines.append("No report was written for this run before it was exported.")
    lines += ["", "## Usage", "",
              "With the BIVA toolkit (its `scripts/`), every script that takes "
              "`--run` takes this folder or its hub repository id:", "", "```bash", *usage, "```", ""]
    return "\n".join(lines)


def check_can_push() -> None:
    """Refuse --push-to-hub before anything is written when it cannot work: offline or not logged in."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise UserError("--push-to-hub needs the Hugging Face Hub but HF_HUB_OFFLINE is set; "
                        "unset it, or export without --push-to-hub and upload the folder later")
    if get_token() is None:
        raise UserError("--push-to-hub needs a Hugging Face token; log in with `hf auth login` or set HF_TOKEN")


def push_folder(folder: Path, repo_id: str, private: bool) -> str:
    """Create (if needed) the model repository and upload the folder; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload BIVA model (scripts/export.py)")
    except Exception as err:  # an external service: auth, network, quota; the folder itself is complete
        text = str(err).strip()
        why = text.splitlines()[0] if text else type(err).__name__
        raise UserError(f"exported to {folder} but the upload to {repo_id} failed ({why}); fix that and upload "
                        f"the folder with `hf upload {repo_id} {folder}`") from None
    return str(url)
