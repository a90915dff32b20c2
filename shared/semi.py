"""The semi-supervised objective of a conditional ladder (seed's Appendix B, eqs. 16-19; M2 of
Kingma et al. 2014), for a model with ``num_classes`` C > 0.

- labelled (x, y):  -F(x, y) = E_q(z|x,y)[log p(x|z,y) + log p(z|y) - log q(z|x,y)] + log p(y),
  log p(y) = -log C (uniform);
- unlabelled x:     -U(x) = sum_y q(y|x) (-F(x, y)) + H(q(y|x)), y summed out exactly over the C
  classes in one pass of the batch repeated C times. Every class's pass draws the noise the
  example draws alone (common random numbers, ``RepeatedNoise``), so U(x) depends on the example's
  own noise only, never on the batching;
- loss = mean_labelled [F(x, y) + alpha * CE(q(y|x), y)] + mean_unlabelled [U(x)], the latent KL of
  each part under free bits per group (for U, the q(y|x)-weighted KL of each group).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError
from .free_bits import free_bits_kl
from .model import LadderModel, ModelOutput


def alpha_rule(n_labelled: int, n_unlabelled: int, beta: float = 0.1) -> float:
    """Weight of the labelled examples' cross-entropy: alpha = beta * (N_l + N_u) / N_l.

    Kingma et al. (2014) and Maaloe et al. (2016) weigh E_labelled[-log q(y|x)] by alpha = beta * N
    (beta = 0.1, N = N_l + N_u) in an objective summed over the N examples; per labelled example that
    is beta * N / N_l times its bound. ``semi_supervised_loss`` takes per-example means, so the same
    ratio is alpha = beta * (N_l + N_u) / N_l (e.g. MNIST, 100 labels: 0.1 * 60000 / 100 = 60).
    """
    if n_labelled < 1 or n_unlabelled < 0:
        raise UserError(f"the alpha rule needs at least one labelled example and no negative counts, "
                        f"got {n_labelled} labelled and {n_unlabelled} unlabelled")
    if beta < 0:
        raise UserError(f"the classifier weight beta must be >= 0, got {beta}")
    return float(beta) * (n_labelled + n_unlabelled) / n_labelled


def _check(model) -> None:
    if not getattr(model, "num_classes", 0):
        raise ValueError("the semi-supervised bounds need a conditional model (num_classes > 0)")


def labelled_output(model: LadderModel, batch: dict, noise, *, k: int = 0,
                    analytic_kl: bool = False) -> tuple[torch.Tensor, ModelOutput]:
    """Logits of q(y|x) (B, C) and the ModelOutput of (x, batch["y"]) from one embedding of x."""
    _check(model)
    e0, target = model.embed(batch, noise)
    out = model.score(e0, target, batch, noise, k=k, analytic_kl=analytic_kl, y=batch["y"])
    return model.ladder.classify(e0), out


def sum_out_classes(logits: torch.Tensor, per_class: ModelOutput) -> ModelOutput:
    """The ModelOutput of y summed out under q(y|x), from the B*C rows of ``forward_each_class``.

    Every term is its q(y|x)-weighted sum over the classes, and ``class_term`` is
    sum_y q(y|x) (log p(y) - log q(y|x)), so ``bound()`` is -U(x) and ``kl`` the weighted KL per group.
    """
    B, C = logits.shape
    log_qy = F.log_softmax(logits.float(), dim=1)  # (B, C)
    qy = log_qy.exp()

    def weigh(t: torch.Tensor | None) -> torch.Tensor | None:  # (B*C, ...) -> (B, ...)
        if t is None:
            return None
        t = t.view(B, C, *t.shape[1:])
        return (qy.view(B, C, *([1] * (t.dim() - 2))) * t).sum(dim=1)

    return ModelOutput(
        log_px=weigh(per_class.log_px), log_q=weigh(per_class.log_q), log_p=weigh(per_class.log_p),
        scored=per_class.scored, kl_analytic=weigh(per_class.kl_analytic),
        class_term=(qy * (-math.log(C) - log_qy)).sum(dim=1),
    )


def unlabelled_output(model: LadderModel, batch: dict, noise, *, k: int = 0,
                      analytic_kl: bool = False) -> tuple[torch.Tensor, ModelOutput]:
    """Logits of q(y|x) (B, C) and the ModelOutput with y summed out (``sum_out_classes``)."""
    _check(model)
    logits, per_class = model.forward_each_class(batch, noise, k=k, analytic_kl=analytic_kl)
    return logits, sum_out_classes(logits, per_class)


def labelled_bound(model: LadderModel, batch: dict, noise, k: int = 0) -> torch.Tensor:
    """-F(x, y) per example (B,): the ELBO of (x, y) including log p(y) = -log C (L^{>k} with k > 0)."""
    return labelled_output(model, batch, noise, k=k)[1].bound()


def unlabelled_bound(model: LadderModel, batch: dict, noise, k: int = 0) -> torch.Tensor:
    """-U(x) = sum_y q(y|x) (-F(x, y) - log q(y|x)) per example (B,), a lower bound on log p(x)."""
    return unlabelled_output(model, batch, noise, k=k)[1].bound()


@dataclass
class SemiTerms:
    loss: torch.Tensor  # scalar to minimise
    bound_labelled: torch.Tensor  # (B_l,) -F(x, y), detached
    bound_unlabelled: torch.Tensor  # (B_u,) -U(x), detached
    kl: torch.Tensor  # (B_l + B_u, G) per-group KL (q(y|x)-weighted for the unlabelled rows), detached
    cross_entropy: torch.Tensor  # scalar, mean over the labelled batch of -log q(y|x), detached
    accuracy: torch.Tensor  # scalar, argmax q(y|x) == y over the labelled batch


def _kl_loss(out: ModelOutput, free_bits, analytic_kl: bool) -> torch.Tensor:
    """sum_g max(lambda_g, mean_b kl_g): free bits per group, as in the unsupervised loss."""
    kl = out.kl_analytic if (analytic_kl and out.kl_analytic is not None) else out.kl
    G = kl.shape[1]
    if G == 0:
        return kl.new_zeros(())
    lam = torch.as_tensor(free_bits, dtype=torch.float64).flatten().tolist()
    if len(set(lam)) == 1:  # one lambda for every group (the plateau schedule's lambda_g = B / G)
        return free_bits_kl(kl, lam[0])
    if len(lam) != G:
        raise ValueError(f"free_bits has {len(lam)} lambdas for {G} latent groups")
    return sum(free_bits_kl(kl[:, g:g + 1], lam[g]) for g in range(G))


def semi_supervised_loss(model: LadderModel, labelled: dict, unlabelled: dict | None, noise, free_bits,
                         alpha: float, analytic_kl: bool = False) -> SemiTerms:
    """mean_l [F(x, y) + alpha * CE] + mean_u [U(x)], each KL under free bits per group.

    ``free_bits``: lambda per group, a float (all groups) or (G,); ``unlabelled`` may be None (a
    labelled-only step). Gradients reach q(y|x) through alpha * CE and through U's weights q(y|x).
    """
    logits_l, out_l = labelled_output(model, labelled, noise, analytic_kl=analytic_kl)
    y = labelled["y"].long()
    cross_entropy = F.cross_entropy(logits_l, y)
    loss = (-(out_l.log_px + out_l.class_term).mean() + _kl_loss(out_l, free_bits, analytic_kl)
            + alpha * cross_entropy)
    bounds_u, kls = out_l.bound().new_zeros(0), [out_l.kl]
    if unlabelled is not None:
        _, out_u = unlabelled_output(model, unlabelled, noise, analytic_kl=analytic_kl)
        loss = loss - (out_u.log_px + out_u.class_term).mean() + _kl_loss(out_u, free_bits, analytic_kl)
        bounds_u = out_u.bound()
        kls.append(out_u.kl)
    return SemiTerms(
        loss=loss,
        bound_labelled=out_l.bound().detach(),
        bound_unlabelled=bounds_u.detach(),
        kl=torch.cat(kls).detach(),
        cross_entropy=cross_entropy.detach(),
        accuracy=(logits_l.argmax(dim=1) == y).float().mean(),
    )
