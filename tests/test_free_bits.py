import pytest
import torch

from shared.free_bits import FreeBitsSchedule, free_bits_kl


def test_free_bits_loss_differs_from_elbo_only_through_the_clamp():
    torch.manual_seed(0)
    kl = torch.rand(32, 5) * torch.tensor([0.1, 0.5, 1.0, 3.0, 6.0])  # (B, G)
    plain = kl.mean(0).sum()
    assert torch.allclose(free_bits_kl(kl, 0.0), plain)
    lam = 1.0
    expected = plain + torch.relu(lam - kl.mean(0)).sum()
    assert torch.allclose(free_bits_kl(kl, lam), expected)
    # Groups above lambda keep their gradient; clamped groups get none.
    kl.requires_grad_(True)
    free_bits_kl(kl, lam).backward()
    above = kl.detach().mean(0) > lam
    assert (kl.grad[:, above] > 0).all() and (kl.grad[:, ~above] == 0).all()


def test_plateau_schedule_lowers_budget_to_zero_and_restores():
    s = FreeBitsSchedule(budget=8.0, num_groups=4, patience=2, factor=0.5, threshold=0.1, min_budget=1.5)
    assert s.per_group == 2.0
    assert s.step(-100.0) is None  # first evaluation: an improvement
    assert s.step(-99.95) is None  # below the threshold: one bad evaluation
    assert s.step(-99.99) is not None and s.budget == 4.0  # patience reached
    assert s.step(-50.0) is None and s.budget == 4.0  # real improvement resets patience
    s.step(-50.0)
    s.step(-50.0)
    assert s.budget == 2.0
    saved = s.state_dict()
    s.step(-50.0)
    s.step(-50.0)
    assert s.budget == 0.0  # 1.0 < min_budget: fine-tuning with lambda = 0
    assert s.per_group == 0.0
    s.step(-50.0)
    assert s.budget == 0.0  # stays at zero
    restored = FreeBitsSchedule(budget=8.0, num_groups=4, patience=2, factor=0.5, threshold=0.1, min_budget=1.5)
    restored.load_state_dict(saved)
    assert restored.budget == 2.0 and restored.state_dict() == saved


def test_factor_zero_goes_straight_to_fine_tuning():
    s = FreeBitsSchedule(budget=30.0, num_groups=13, patience=1, factor=0.0)
    s.step(-10.0)
    s.step(-10.0)
    assert s.budget == 0.0


@pytest.mark.parametrize("budget", [0.0])
def test_zero_budget_never_changes(budget):
    s = FreeBitsSchedule(budget=budget, num_groups=3, patience=1)
    for _ in range(5):
        assert s.step(-1.0) is None
    assert s.budget == 0.0
