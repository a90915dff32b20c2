"""Free bits (Kingma et al. 2016) and the free-bits-on-plateau schedule (docs/design.md §5).

Torch is imported by ``free_bits_kl`` only: the command line reads the schedule's constants before
anything heavy is loaded.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

THRESHOLD_MODES = ("abs", "rel")  # ReduceLROnPlateau's threshold_mode


def free_bits_kl(kl: torch.Tensor, lam: float) -> torch.Tensor:
    """The KL term of the training loss: sum_g max(lam, mean_b kl_g) for kl (B, G).

    With lam = 0 it is the plain batch-mean KL (no clamp), so the loss is exactly the negative ELBO.
    """
    import torch

    mean_kl = kl.float().mean(dim=0)
    if lam > 0:
        mean_kl = torch.clamp(mean_kl, min=lam)
    return mean_kl.sum()


class FreeBitsSchedule:
    """A total budget B split equally over G groups (lambda_g = B / G), lowered on plateaus.

    ``step(valid_elbo)`` is called after each evaluation with the EMA model's validation ELBO (nats
    per data point, higher is better). The plateau rule is ``torch.optim.lr_scheduler.ReduceLROnPlateau``'s
    in mode max: an evaluation is an improvement only when it beats ``best`` by more than ``threshold``
    (``threshold_mode`` "abs": nats per data point; "rel": a fraction of |best|), and ``best`` moves only
    on such an improvement, so a slow, steady gain is measured from the best value at the last real
    improvement and is not taken for a plateau. After ``patience`` evaluations in a row without one,
    B <- max(B * factor, min_budget) and the count restarts; ``min_budget`` is a floor the budget stops
    at. A floor of 0 is reached once lambda_g would fall below ``ZERO_BELOW`` nats (with factor > 0
    B * factor never reaches 0 by itself). Every rank sees the same gathered ELBO, so every rank decides
    the same.
    """

    # nats per group: a group held at this little KL carries next to no information about x,
    # so with a floor of 0 the schedule takes the last step to the plain ELBO instead of halving forever.
    ZERO_BELOW = 0.05

    def __init__(self, budget: float, num_groups: int, patience: int = 4, factor: float = 0.5,
                 threshold: float = 0.05, min_budget: float = 1.0, threshold_mode: str = "abs"):
        if threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}")
        self.budget = float(budget)
        self.num_groups = max(int(num_groups), 1)
        self.patience, self.factor = int(patience), float(factor)
        self.threshold, self.min_budget = float(threshold), float(min_budget)
        self.threshold_mode = threshold_mode
        self.best = float("-inf")
        self.bad_evals = 0  # evaluations since the last real improvement (or since the last drop)

    @property
    def per_group(self) -> float:
        return self.budget / self.num_groups

    def is_improvement(self, valid_elbo: float) -> bool:
        """ReduceLROnPlateau's ``_is_better`` in mode max; "rel" scales by |best|, which torch's
        ``best * (1 + threshold)`` gets wrong for a negative best (every ELBO is one)."""
        if self.best == float("-inf"):
            return valid_elbo > self.best
        margin = self.threshold * abs(self.best) if self.threshold_mode == "rel" else self.threshold
        return valid_elbo > self.best + margin

    def lowered(self) -> float:
        """The budget after one drop: B * factor, not below the floor; a floor of 0 is reached below
        ZERO_BELOW nats per group."""
        budget = max(self.budget * self.factor, self.min_budget)
        if self.min_budget == 0 and budget / self.num_groups < self.ZERO_BELOW:
            budget = 0.0
        return budget

    def step(self, valid_elbo: float) -> str | None:
        """Record one evaluation; returns a message when the budget changed."""
        if self.is_improvement(valid_elbo):
            self.best = valid_elbo
            self.bad_evals = 0
            return None
        self.bad_evals += 1
        if self.bad_evals < self.patience or self.budget <= self.min_budget:  # at the floor: nothing to lower
            return None
        old = self.budget
        self.budget = self.lowered()
        self.bad_evals = 0
        floor = " (the floor)" if self.budget == self.min_budget else ""
        return (f"free bits: no validation ELBO gain above {self._threshold_text()} over the best {self.best:.4g} "
                f"for {self.patience} evaluations; budget {old:.3g} -> {self.budget:.3g} nats{floor} "
                f"({self.per_group:.3g} per group)")

    def _threshold_text(self) -> str:
        if self.threshold_mode == "rel":
            return f"{self.threshold:g} x |best|"
        return f"{self.threshold:g} nats"

    def state_dict(self) -> dict:
        return {"budget": self.budget, "best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.budget = float(state["budget"])
        self.best = float(state["best"])
        self.bad_evals = int(state["bad_evals"])
