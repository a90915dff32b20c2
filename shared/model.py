"""What every model offers the engine and the bounds, and the base class of ladder models.

A model maps a batch (a dict with an ``index`` entry, the example ids) and a noise source to a
``ModelOutput``: log p(x | z) per example and log q / log p of every latent group at the samples.
Ladder models (BIVA, LVAE, LVAE+ for images and text) subclass ``LadderModel`` and only say how
to embed the data and how to score it from d_0; models without a ladder (the text baselines)
produce a ``ModelOutput`` directly.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from .ladder import Ladder, LadderConfig


@dataclass
class ModelOutput:
    log_px: torch.Tensor  # (B,) fp32, log p(x | z)
    log_q: torch.Tensor  # (B, G) fp32
    log_p: torch.Tensor  # (B, G) fp32
    scored: list[bool]  # per group: part of the bound (False for levels <= k in L^{>k})
    kl_analytic: torch.Tensor | None = None  # (B, G), training-loss option only
    d0: torch.Tensor | None = None

    @property
    def kl(self) -> torch.Tensor:
        """Single-sample KL per group, log q - log p at the samples: (B, G)."""
        return self.log_q - self.log_p

    def bound(self) -> torch.Tensor:
        """log p(x|z) + sum over scored groups of (log p - log q): the ELBO, or L^{>k}. (B,)"""
        if self.log_q.shape[1] == 0:
            return self.log_px
        mask = torch.tensor(self.scored, device=self.log_q.device)
        return self.log_px - torch.where(mask, self.kl, torch.zeros_like(self.kl)).sum(dim=1)


class LatentVariableModel(nn.Module, ABC):
    """Interface of every model the engine trains."""

    modality: str = "?"
    group_info: list[dict] = []

    @property
    def num_groups(self) -> int:
        return len(self.group_info)

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


class LadderModel(LatentVariableModel):
    """A modality adapter around the one ladder: ``embed`` gives e_0, ``log_likelihood`` scores x from d_0."""

    def __init__(self, ladder_cfg: LadderConfig):
        super().__init__()
        self.ladder = Ladder(ladder_cfg)
        self.group_info = self.ladder.group_info

    @abstractmethod
    def embed(self, batch: dict, noise) -> tuple[torch.Tensor, object]:
        """Returns e_0 (B, C, *S) and the data target passed on to ``log_likelihood``."""
        ...

    @abstractmethod
    def log_likelihood(self, d0: torch.Tensor, target, batch: dict) -> torch.Tensor:
        ...

    def forward(self, batch, noise, *, mode="posterior", k=0, analytic_kl=False) -> ModelOutput:
        e0, target = self.embed(batch, noise)
        out = self.ladder(e0, noise, mode=mode, k=k, analytic_kl=analytic_kl)
        return ModelOutput(
            log_px=self.log_likelihood(out.d0, target, batch),
            log_q=out.log_q, log_p=out.log_p, scored=out.scored,
            kl_analytic=out.kl_analytic, d0=out.d0,
        )

    def posterior_means(self, batch, noise) -> list[torch.Tensor]:
        e0, _ = self.embed(batch, noise)
        return self.ladder(e0, noise, mode="posterior_mean").means

    def decode_prior(self, n: int, noise, temperature: float = 1.0, device=None) -> torch.Tensor:
        """d_0 for n draws from the prior."""
        device = device or next(self.parameters()).device
        return self.ladder(None, noise, mode="prior", batch_size=n, temperature=temperature, device=device).d0
