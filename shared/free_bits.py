"""Free bits (Kingma et al. 2016) and the free-bits-on-plateau schedule (DESIGN.md §5)."""
from __future__ import annotations

import torch


def free_bits_kl(kl: torch.Tensor, lam: float) -> torch.Tensor:
    """The KL term of the training loss: sum_g max(lam, mean_b kl_g) for kl (B, G).

    With lam = 0 it is the plain batch-mean KL (no clamp), so the loss is exactly the negative ELBO.
    """
    mean_kl = kl.float().mean(dim=0)
    if lam > 0:
        mean_kl = torch.clamp(mean_kl, min=lam)
    return mean_kl.sum()


class FreeBitsSchedule:
    """A total budget B split equally over G groups (lambda_g = B / G), lowered on plateaus.

    ``step(valid_elbo)`` is called after each evaluation with the EMA model's validation ELBO (nats
    per data point, higher is better). When it has not improved by more than ``threshold`` for
    ``patience`` evaluations, B <- B * factor; once B falls below ``min_budget`` it becomes 0
    (fine-tuning with lambda = 0). Every rank sees the same gathered ELBO, so every rank decides
    the same.
    """

    def __init__(self, budget: float, num_groups: int, patience: int = 4, factor: float = 0.5,
                 threshold: float = 0.05, min_budget: float = 1.0):
        self.budget = float(budget)
        self.num_groups = max(int(num_groups), 1)
        self.patience, self.factor = int(patience), float(factor)
        self.threshold, self.min_budget = float(threshold), float(min_budget)
        self.best = float("-inf")
        self.bad_evals = 0

    @property
    def per_group(self) -> float:
        return self.budget / self.num_groups

    def step(self, valid_elbo: float) -> str | None:
        """Record one evaluation; returns a message when the budget changed."""
        if valid_elbo > self.best + self.threshold:
            self.best = valid_elbo
            self.bad_evals = 0
            return None
        self.best = max(self.best, valid_elbo)
        if self.budget <= 0:
            return None
        self.bad_evals += 1
        if self.bad_evals < self.patience:
            return None
        old = self.budget
        self.budget = old * self.factor
        if self.budget < self.min_budget:
            self.budget = 0.0
        self.bad_evals = 0
        return (f"free bits: validation ELBO flat for {self.patience} evaluations; "
                f"budget {old:.3g} -> {self.budget:.3g} nats ({self.per_group:.3g} per group)")

    def state_dict(self) -> dict:
        return {"budget": self.budget, "best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.budget = float(state["budget"])
        self.best = float(state["best"])
        self.bad_evals = int(state["bad_evals"])
