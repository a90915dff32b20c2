"""Evaluating a text run: the paper's Table 7 figures and latent usage (docs/design.md §3, docs/reference.md).

``text_report`` gives, per sentence and in nats: -L_1 (``nll_elbo``), -L_K (``nll_iw``), the KL
(total and per group), perplexities exp(sum NLL / sum tokens) with tokens counting EOS, active units
and the mutual information I(x; z) of He et al. (2019), estimated on minibatches of 64:

    I = mean_i [ log q(z_i | x_i) - log q(z_i) ],   z_i ~ q(z | x_i),
    log q(z_i) ~= logsumexp_j log q(z_i | x_j) - log B   over the B sentences of the minibatch,

with z all latent groups together: log q(z_i | x_j) scores sentence i's sample of every group under
sentence j's posterior, each group conditioned on z_i's own parents (the ladder's fixed-latent
pass). The estimate is at most log B (4.16 nats for B = 64).
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from shared.distributions import HashedNoise
from shared.errors import UserError
from shared.evaluate import evaluate, subset_indices
from shared.run_dir import load_weights, read_run_config

from .data import TextDataConfig, prepare_text_data
from .model import TextModelConfig, build_text_model, num_params
from .tokenizer import EOS_ID, PAD_ID, Tokenizer

MI_BATCH = 64


def load_text_run(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(run config, model with the EMA weights in eval mode, tokenizer) of a text run directory."""
    run_dir = Path(run_dir)
    run = read_run_config(run_dir, "text")
    from shared.config import from_dict

    cfg = from_dict(TextModelConfig, run.model, f"{run_dir / 'config.json'} model").validate()
    model = load_weights(run_dir, build_text_model(cfg)).to(device).eval()
    tokenizer = Tokenizer.load(run_dir / "tokenizer.model")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise UserError(f"{run_dir / 'tokenizer.model'} has {tokenizer.vocab_size} pieces but the model "
                        f"{cfg.vocab_size}; the run directory's tokenizer was replaced, restore it")
    return run, model, tokenizer


def load_text_split(run, run_dir: str | Path, split: str, cache_dir: str | Path | None = None,
                    moved: dict[str, list[str]] | None = None):
    """The run's own data (saved data config and tokenizer; the token cache makes this cheap).

    ``moved``: {"train_files": [...], ...}, the run's text files at other paths (another machine):
    they replace the recorded paths, and the splits they give must have the sizes the run recorded.
    Recorded files that are missing, with no replacement, are one error that names the flags."""
    from shared.config import from_dict

    data_cfg = from_dict(TextDataConfig, run.data, "config.json data")
    for key, files in (moved or {}).items():
        if not getattr(data_cfg, key):
            raise UserError(f"--{key.replace('_', '-')} replaces files the run recorded, but it had none "
                            f"({'the hub dataset ' + data_cfg.dataset if key == 'train_files' else 'its split was carved from the training text'})")
        setattr(data_cfg, key, files)
    for key in ("train_files", "valid_files", "test_files"):
        missing = [f for f in getattr(data_cfg, key) if not Path(f).is_file()]
        if missing:
            raise UserError(f"the run's {key.split('_')[0]} text {missing[0]} is not on this machine; pass "
                            f"--{key.replace('_', '-')} with its copy here")
    cache_dir = cache_dir or run.extra.get("cache_dir")
    splits = prepare_text_data(data_cfg, run_dir, cache_dir=cache_dir)
    recorded = run.extra.get("data_stats", {}).get("splits")
    if moved and recorded:
        for name, counts in recorded.items():
            now = splits.stats["splits"].get(name, {})
            if any(now.get(k) != counts.get(k) for k in ("sentences", "kept", "tokens")):
                raise UserError(f"the files given hold other text than the run's: its {name} split had "
                                f"{counts.get('kept')} sentences of {counts.get('tokens')} tokens, these give "
                                f"{now.get('kept')} of {now.get('tokens')}")
    return splits.split(split)


def split_sentences(run_dir: str | Path, split: str, num: int, seed: int = 0) -> list[str]:
    """``num`` sentences of the run's own ``split`` as text (tokenised like the training text), a random
    draw seeded by ``seed`` (report_text.py's --max-sentences draw), in the split's order; all of them
    when the split has fewer."""
    run = read_run_config(run_dir, "text")
    data = load_text_split(run, run_dir, split)
    if len(data) == 0:
        raise UserError(f"the {split} split of {run_dir} is empty; choose another --split")
    chosen = subset_indices(len(data), num, seed)
    return Tokenizer.load(Path(run_dir) / "tokenizer.model").decode(data.tokens[chosen].tolist())


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _rows(batch: dict, index: torch.Tensor) -> dict:
    return {k: v[index] if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def mutual_information(model, dataset, *, seed: int = 0, batch_size: int = MI_BATCH, max_examples: int | None = None,
                       max_batches: int | None = None, rows_per_pass: int = 2048, device=None,
                       progress: bool = True) -> float:
    """He et al. (2019)'s estimate of I(x; z) in nats, over all latent groups (see the module doc)."""
    device = device or next(model.parameters()).device
    chosen = subset_indices(len(dataset), max_examples, seed, getattr(dataset, "labels", None))
    loader = DataLoader(Subset(dataset, chosen.tolist()), batch_size=batch_size, shuffle=False)
    total, count = 0.0, 0
    for b, batch in enumerate(tqdm(loader, desc="mutual information", leave=False, disable=not progress)):
        if max_batches is not None and b >= max_batches:
            break
        batch = _to(batch, device)
        B = batch["index"].shape[0]
        if B < 2:
            continue  # one sentence says nothing about the aggregate posterior
        latents, log_q_self = model.posterior_sample(batch, HashedNoise(seed, batch["index"]))
        log_qz = []
        per_pass = max(1, rows_per_pass // B)
        for start in range(0, B, per_pass):
            i = torch.arange(start, min(B, start + per_pass), device=device)
            pairs_i = i.repeat_interleave(B)  # rows (i, j), j fastest
            pairs_j = torch.arange(B, device=device).repeat(len(i))
            cross = model.posterior_log_density(_rows(batch, pairs_j), [z[pairs_i] for z in latents])
            log_qz.append(torch.logsumexp(cross.view(len(i), B).double(), dim=1) - math.log(B))
        total += float((log_q_self.double() - torch.cat(log_qz)).sum())
        count += B
    return total / max(count, 1)


def unigram_overlap(hypothesis: list[int], reference: list[int]) -> float:
    """Clipped unigram precision (BLEU-1 without brevity penalty): the share of the hypothesis's tokens
    that the reference holds, each reference token matched at most once; 0 for an empty hypothesis."""
    if not hypothesis:
        return 0.0
    left = Counter(reference)
    hits = 0
    for token in hypothesis:
        if left[token] > 0:
            left[token] -= 1
            hits += 1
    return hits / len(hypothesis)


@torch.no_grad()
def reconstruction_stats(model, dataset, *, seed: int = 0, batch_size: int = 64, max_examples: int | None = None,
                         others: int = 10, device=None, progress: bool = True) -> dict:
    """How much of a sentence its latents carry, on the sentences of ``dataset`` (nats per sentence):

    ``reconstruction_gain``: mean of log p(x | z ~ q(z | x)) - log p(x | z ~ p(z)), one sample of each
    (seeded); 0 when the decoder ignores z. ``unigram_overlap``: greedy reconstructions x' of x (z ~ q),
    the clipped unigram precision of x' against x itself (``own``) and against ``others`` other
    sentences of the split drawn at random (``other``, their mean): ``ratio`` = own / other.
    ``unigram_overlap_mean``: the same for greedy reconstructions from the posterior means."""
    from .decode import DecodeOptions, reconstruct

    device = device or next(model.parameters()).device
    chosen = subset_indices(len(dataset), max_examples, seed, None)
    loader = DataLoader(Subset(dataset, chosen.tolist()), batch_size=batch_size, shuffle=False)
    gain, count, hyps, refs = 0.0, 0, {False: [], True: []}, []
    opts = DecodeOptions(method="greedy", seed=seed)
    for batch in tqdm(loader, desc="reconstructions", leave=False, disable=not progress):
        batch = _to(batch, device)
        posterior = model(batch, HashedNoise(seed, batch["index"]), mode="posterior").log_px
        prior = model(batch, HashedNoise(seed + 1, batch["index"]), mode="prior").log_px
        gain += float((posterior.double() - prior.double()).sum())
        count += posterior.shape[0]
        for mean, rows in hyps.items():
            for row in reconstruct(model, batch, opts, posterior_mean=mean).tolist():
                rows.append([t for t in row[:row.index(EOS_ID)] if t != PAD_ID] if EOS_ID in row else
                            [t for t in row if t != PAD_ID])
        tokens = model.padded_tokens(batch)
        refs += [t[:n - 1] for t, n in zip(tokens.tolist(), batch["length"].tolist())]  # without EOS
    return {"reconstruction_gain": gain / max(count, 1),
            "unigram_overlap": own_and_other_overlap(hyps[False], refs, seed, others),
            "unigram_overlap_mean": own_and_other_overlap(hyps[True], refs, seed, others)}


def own_and_other_overlap(hyps: list[list[int]], refs: list[list[int]], seed: int, others: int) -> dict:
    """Mean ``unigram_overlap`` of each hypothesis with its own reference (``own``) and with ``others``
    other references drawn at random (seeded; ``other``), and their ratio."""
    n = len(hyps)
    own = sum(unigram_overlap(h, r) for h, r in zip(hyps, refs)) / max(n, 1)
    rng = torch.Generator().manual_seed(seed)
    other_sum, other_count = 0.0, 0
    for _ in range(others if n > 1 else 0):
        shift = torch.randint(1, n, (n,), generator=rng)  # j = i + shift (mod n): never i itself
        for i, s in enumerate(shift.tolist()):
            other_sum += unigram_overlap(hyps[i], refs[(i + s) % n])
            other_count += 1
    other = other_sum / max(other_count, 1)
    return {"own": own, "other": other, "ratio": own / other if other > 0 else None, "sentences": n,
            "others_per_sentence": others}


FREQUENT = 50  # teacher_forced_accuracy's "rare" tokens: outside the split's 50 most frequent


@torch.no_grad()
def teacher_forced_accuracy(model, dataset, *, seed: int = 0, batch_size: int = 64, max_examples: int | None = None,
                            frequent: int = FREQUENT, others: int = 10, device=None, progress: bool = True) -> dict | None:
    """What the decoder gets from z, position by position: under teacher forcing (the true previous
    words), the share of words (EOS excluded) that are the decoder's most likely next token, with z
    from the posterior (one sample, seeded) and from the prior; ``rare``: only words outside the
    split's ``frequent`` most frequent tokens (content words rather than punctuation and function
    words); ``overlap``: those most likely tokens read as a sentence, scored like the greedy
    reconstructions of ``reconstruction_stats`` (own / other sentences), so the two tell what z holds
    from what free-running decoding keeps of it. None for a model without an LSTM decoder; for the
    LSTM LM both rows are its own."""
    if not model.autoregressive:
        return None
    device = device or next(model.parameters()).device
    chosen = subset_indices(len(dataset), max_examples, seed, None)
    loader = DataLoader(Subset(dataset, chosen.tolist()), batch_size=batch_size, shuffle=False)
    counts = torch.zeros(model.cfg.vocab_size, dtype=torch.long)
    for batch in loader:
        tokens, lengths = model.padded_tokens(batch), batch["length"].long()
        words = torch.arange(tokens.shape[1])[None, :] < (lengths[:, None] - 1)
        counts += torch.bincount(tokens[words], minlength=model.cfg.vocab_size)
    common = counts.topk(min(frequent, int((counts > 0).sum()))).indices.to(device)
    # all, of all, rare, of rare; a model without latents reads no z: one pass gives both rows
    names = ("posterior", "prior") if model.num_groups else ("posterior",)
    hits = {k: torch.zeros(4, dtype=torch.long) for k in names}
    argmax_rows, refs = {k: [] for k in names}, []
    for batch in tqdm(loader, desc="teacher-forced accuracy", leave=False, disable=not progress):
        batch = _to(batch, device)
        tokens, lengths = model.padded_tokens(batch), batch["length"].long()
        n = int(lengths.max())
        words = torch.arange(n, device=device)[None, :] < (lengths[:, None] - 1)
        rare = words & ~torch.isin(tokens[:, :n], common)
        for name in hits:
            noise = HashedNoise(seed if name == "posterior" else seed + 1, batch["index"])
            cond = (model.condition_posterior(batch, noise) if name == "posterior"
                    else model.condition_prior(tokens.shape[0], noise))
            argmax = model.decoder.next_token_argmax(model.io, tokens, lengths, cond)
            right = argmax == tokens[:, :n]
            hits[name] += torch.stack([(right & words).sum(), words.sum(), (right & rare).sum(), rare.sum()]).cpu()
            argmax_rows[name] += [row[:m - 1] for row, m in zip(argmax.tolist(), lengths.tolist())]
        refs += [row[:m - 1] for row, m in zip(tokens.tolist(), lengths.tolist())]
    rows = {name: {"all": int(h[0]) / max(int(h[1]), 1), "rare": int(h[2]) / max(int(h[3]), 1),
                   "words": int(h[1]), "rare_words": int(h[3]),
                   "overlap": own_and_other_overlap(argmax_rows[name], refs, seed, others)} for name, h in hits.items()}
    return {"posterior": rows["posterior"], "prior": rows.get("prior", rows["posterior"]), "frequent": frequent}


def text_report(model, dataset, *, iw_samples: int = 1000, batch_size: int = 64, seed: int = 0,
                max_examples: int | None = None, mi_batches: int | None = None, iw_chunk: int | None = None,
                device=None) -> dict:
    """The report JSON of docs/reference.md (without the run's identity fields)."""
    has_latents = model.num_groups > 0
    # The LSTM LM's likelihood is exact: no importance samples to draw.
    res = evaluate(model, dataset, batch_size=batch_size, seed=seed, iw_samples=iw_samples if has_latents else 0,
                   iw_chunk=iw_chunk, max_examples=max_examples, active_units=has_latents, device=device,
                   desc="evaluate")
    if res.num_examples == 0:
        raise UserError("the split has no sentence to evaluate")
    tokens = res.num_dims
    nll_elbo = -res.elbo
    nll_iw = -res.iw if res.iw is not None else nll_elbo
    N = res.num_examples
    report = {
        "num_params": num_params(model),
        "iw_samples": iw_samples if has_latents else None,
        "nll": nll_iw,
        "nll_iw": nll_iw,
        "nll_elbo": nll_elbo,
        "kl": res.kl if has_latents else None,
        "ppl": math.exp(nll_iw * N / tokens),
        "ppl_elbo": math.exp(nll_elbo * N / tokens),
        "kl_per_group": None,
        "active_units": None,
        "mutual_info": None,
        "reconstruction_gain": None,
        "unigram_overlap": None,
        "unigram_overlap_mean": None,
        "teacher_forced_accuracy": teacher_forced_accuracy(model, dataset, seed=seed, batch_size=batch_size,
                                                           max_examples=max_examples, device=device),
        "num_sentences": N,
        "num_tokens": int(tokens),
        "likelihood_exact": not has_latents,
        "noise_seed": seed,
        "subset": res.subset,  # {"size", "of", "seed", "stratified"}, or None: the whole split
    }
    if has_latents:
        report["kl_per_group"] = res.labelled_kl_per_group(model.group_info)
        report["active_units"] = res.active_units
        report["mutual_info"] = mutual_information(model, dataset, seed=seed, max_examples=max_examples,
                                                   max_batches=mi_batches, device=device)
        report.update(reconstruction_stats(model, dataset, seed=seed, batch_size=batch_size,
                                           max_examples=max_examples, device=device))
    return report


def plot_kl_per_group(report: dict, path: str | Path, title: str = "") -> None:
    """Bar plot of KL per latent group (the paper's Figure 5), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = report["kl_per_group"]
    labels = [f"{g['kind']}{g['level']}" if g["kind"] != "top" else f"z{g['level']}" for g in groups]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(groups) + 2), 3.2))
    ax.bar(range(len(groups)), [g["kl"] for g in groups], color="tab:blue")
    ax.set_xticks(range(len(groups)), labels, rotation=45 if len(groups) > 6 else 0)
    ax.set_ylabel("KL (nats per sentence)")
    ax.set_xlabel("latent group (top to bottom)")
    ax.set_title(title or "KL per latent group")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table_row(report: dict) -> str:
    """The paper's Table 7 columns: model, params, -log p(x) (L_1), KL, PPL."""
    kl = "–" if report["kl"] is None else f"{report['kl']:.2f}"
    bound = "" if report.get("likelihood_exact") else "≤ "
    return (f"| {report.get('model', '?')} | {report['num_params'] / 1e6:.2f}M | {bound}{report['nll_elbo']:.2f} | "
            f"{kl} | {report['ppl_elbo']:.2f} |")
