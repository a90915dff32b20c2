"""What every model offers the engine and the bounds, and the base class of ladder models.

A model maps a batch (a dict with an ``index`` entry, the example ids) and a noise source to a
``ModelOutput``: log p(x | z) per example and log q / log p of every latent group at the samples.
Ladder models (BIVA, LVAE, LVAE+ for images and text) subclass ``LadderModel`` and only say how
to embed the data and how to score it from d_0; models without a ladder (the text baselines)
produce a ``ModelOutput`` directly.

A conditional ladder (``LadderConfig.num_classes`` C > 0, the M2-style semi-supervised model) adds
``classify`` (logits of q(y|x)) and takes ``y`` in ``forward``; ``forward_each_class`` runs it once
per class for the bounds with y summed out (shared/semi.py).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from .ladder import CLASS_KEY, Ladder, LadderConfig


@dataclass
class ModelOutput:
    log_px: torch.Tensor  # (B,) fp32, log p(x | z)
    log_q: torch.Tensor  # (B, G) fp32
    log_p: torch.Tensor  # (B, G) fp32
    scored: list[bool]  # per group: part of the bound (False for levels <= k in L^{>k})
    kl_analytic: torch.Tensor | None = None  # (B, G), training-loss option only
    d0: torch.Tensor | None = None
    # Conditional models: log p(y) - log q(y|x), the bound's term outside the latent groups: (B,).
    # Given y it is log p(y) = -log C; with y summed out, sum_y q(y|x) (log p(y) - log q(y|x)).
    class_term: torch.Tensor | None = None

    @property
    def kl(self) -> torch.Tensor:
        """Single-sample KL per group, log q - log p at the samples: (B, G)."""
        return self.log_q - self.log_p

    def bound(self) -> torch.Tensor:
        """log p(x|z) + sum over scored groups of (log p - log q): the ELBO, or L^{>k}. (B,)"""
        bound = self.log_px if self.class_term is None else self.log_px + self.class_term
        if self.log_q.shape[1] == 0:
            return bound
        if all(self.scored):  # every group (the ELBO, as in training): no mask to copy to the device
            return bound - self.kl.sum(dim=1)
        mask = torch.tensor(self.scored, device=self.log_q.device)
        return bound - torch.where(mask, self.kl, torch.zeros_like(self.kl)).sum(dim=1)


class LatentVariableModel(nn.Module, ABC):
    """Interface of every model the engine trains."""

    modality: str = "?"
    group_info: list[dict] = []

    @property
    def num_groups(self) -> int:
        return len(self.group_info)

    @property
    def num_classes(self) -> int:
        """C of a conditional (semi-supervised) model; 0 for an unconditional one."""
        return 0

    @property
    def num_levels(self) -> int:
        return max((g["level"] for g in self.group_info), default=0)

    @abstractmethod
    def data_size(self, batch: dict) -> torch.Tensor:
        """Number of scored dimensions per example (sub-pixels, or predicted tokens): (B,)."""
        ...

    @abstractmethod
    def forward(self, batch: dict, noise, *, mode: str = "posterior", k: int = 0,
                analytic_kl: bool = False) -> ModelOutput:
        ...

    @abstractmethod
    def posterior_means(self, batch: dict, noise) -> list[torch.Tensor]:
        """Posterior mean of every group, parents at their means (for active units)."""
        ...


def repeat_batch(batch: dict, n: int) -> dict:
    """Each example repeated n times in a row: (B, ...) → (B*n, ...)."""
    return {k: (v.repeat_interleave(n, dim=0) if torch.is_tensor(v) else v) for k, v in batch.items()}


class LadderModel(LatentVariableModel):
    """A modality adapter around the one ladder: ``embed`` gives e_0, ``log_likelihood`` scores x from d_0."""

    def __init__(self, ladder_cfg: LadderConfig):
        super().__init__()
        self.ladder = Ladder(ladder_cfg)
        self.group_info = self.ladder.group_info

    @property
    def num_classes(self) -> int:
        return self.ladder.cfg.num_classes

    @abstractmethod
    def embed(self, batch: dict, noise) -> tuple[torch.Tensor, object]:
        """Returns e_0 (B, C, *S) and the data target passed on to ``log_likelihood``."""
        ...

    @abstractmethod
    def log_likelihood(self, d0: torch.Tensor, target, batch: dict) -> torch.Tensor:
        ...

    def forward(self, batch, noise, *, mode="posterior", k=0, analytic_kl=False, y=None) -> ModelOutput:
        """``y`` (int64 (B,)): the class of every example, required by a conditional model (whose
        bound then includes log p(y)); sum it out with ``forward_each_class`` / shared/semi.py."""
        if self.num_classes and y is None:
            raise ValueError("a conditional model needs y; sum y out through shared/semi.py or forward_each_class")
        e0, target = self.embed(batch, noise)
        return self.score(e0, target, batch, noise, mode=mode, k=k, analytic_kl=analytic_kl, y=y)

    def score(self, e0, target, batch, noise, *, mode="posterior", k=0, analytic_kl=False, y=None,
              repeats: int = 1) -> ModelOutput:
        """``forward`` from an embedding e_0 (and its target), e.g. one shared with ``ladder.classify``.
        With ``repeats`` (see ``Ladder.forward``) target and batch hold the repeated rows."""
        out = self.ladder(e0, noise, mode=mode, k=k, analytic_kl=analytic_kl, y=y, repeats=repeats)
        log_px = self.log_likelihood(out.d0, target, batch)
        return ModelOutput(
            log_px=log_px,
            log_q=out.log_q, log_p=out.log_p, scored=out.scored,
            kl_analytic=out.kl_analytic, d0=out.d0,
            class_term=None if y is None else torch.full_like(log_px, -math.log(self.num_classes)),
        )

    def classify(self, batch: dict, noise) -> torch.Tensor:
        """Logits of q(y|x): (B, C) fp32. ``noise`` only embeds the data (e.g. dynamic binarisation)."""
        if not self.num_classes:
            raise ValueError("an unconditional model has no classifier (num_classes = 0)")
        e0, _ = self.embed(batch, noise)
        return self.ladder.classify(e0)

    def forward_each_class(self, batch: dict, noise, *, k: int = 0, analytic_kl: bool = False,
                           with_logits: bool = True) -> tuple[torch.Tensor | None, ModelOutput]:
        """The conditional model once per class, on one embedding of the batch.

        Returns the logits of q(y|x) (B, C) (None without ``with_logits``) and the ModelOutput of the
        B*C rows (example b, class y) at row b*C + y, each with the bound of (x_b, y). One bottom-up
        pass, C top-down passes; every class's pass draws the same noise (common random numbers), the
        noise ``forward(..., y=y)`` draws.
        """
        C = self.num_classes
        if not C:
            raise ValueError("forward_each_class needs a conditional model (num_classes > 0)")
        e0, target = self.embed(batch, noise)
        logits = self.ladder.classify(e0) if with_logits else None
        y = torch.arange(C, device=e0.device).repeat(e0.shape[0])
        target = target.repeat_interleave(C, dim=0) if torch.is_tensor(target) else repeat_batch(target, C)
        out = self.score(e0, target, repeat_batch(batch, C), noise, k=k, analytic_kl=analytic_kl, y=y, repeats=C)
        return logits, out

    def _class_of(self, batch: dict, e0: torch.Tensor) -> torch.Tensor | None:
        """y for a single pass of a conditional model: the batch's labels, else argmax q(y|x)."""
        if not self.num_classes:
            return None
        return batch["y"] if "y" in batch else self.ladder.classify(e0).argmax(dim=1)

    def posterior_means(self, batch, noise) -> list[torch.Tensor]:
        """For a conditional model y is the batch's label, else the mode of q(y|x)."""
        e0, _ = self.embed(batch, noise)
        return self.ladder(e0, noise, mode="posterior_mean", y=self._class_of(batch, e0)).means

    def decode_prior(self, n: int, noise, temperature: float = 1.0, device=None,
                     y: torch.Tensor | None = None) -> torch.Tensor:
        """d_0 for n draws from the prior; a conditional model draws y (n,) uniformly when not given."""
        device = device or next(self.parameters()).device
        if self.num_classes and y is None:
            u = noise.uniform((n, 1), CLASS_KEY, device)[:, 0]
            y = (u * self.num_classes).long().clamp(max=self.num_classes - 1)
        return self.ladder(None, noise, mode="prior", batch_size=n, temperature=temperature, device=device,
                           y=None if y is None else y.to(device)).d0
