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


def schedule(**kw) -> FreeBitsSchedule:
    kw = {"budget": 8.0, "num_groups": 4, "patience": 2, "factor": 0.5, "threshold": 0.05, "min_budget": 1.0, **kw}
    return FreeBitsSchedule(**kw)


def test_slow_steady_gain_is_not_a_plateau():
    # +0.03 nats per evaluation, threshold 0.05: the old rule moved `best` on every gain, called each
    # evaluation flat and halved the budget every `patience` evaluations. Measured from the best at the
    # last real improvement, every second evaluation is one (0.06 > 0.05).
    s = schedule(patience=2)
    for i in range(40):
        assert s.step(-100.0 + 0.03 * i) is None
    assert s.budget == 8.0
    assert s.best == pytest.approx(-100.0 + 0.03 * 38)  # moved only on real improvements


def test_gain_below_threshold_never_moves_best():
    s = schedule(patience=100)
    s.step(-100.0)
    for i in range(1, 10):
        s.step(-100.0 + 0.01 * i)  # the total gain stays below 0.05 until the fifth evaluation...
    assert s.best == pytest.approx(-100.0 + 0.06) and s.bad_evals == 3  # ...then 0.06 counts; 3 since


def test_flat_sequence_fires_after_patience_and_restarts_the_count():
    s = schedule(patience=3)
    assert s.step(-50.0) is None  # first evaluation: an improvement over -inf
    assert s.step(-50.0) is None and s.step(-50.01) is None and s.budget == 8.0
    message = s.step(-49.97)  # +0.03: still no real improvement, third bad evaluation
    assert message is not None and "8 -> 4" in message and s.budget == 4.0 and s.bad_evals == 0
    for _ in range(2):
        assert s.step(-50.0) is None
    assert s.step(-50.0) is not None and s.budget == 2.0  # patience restarted after the drop
    assert s.step(-40.0) is None and s.best == -40.0 and s.bad_evals == 0  # a real improvement resets it


def test_relative_threshold():
    # rel: an improvement must beat best by threshold * |best| (ELBOs are negative: torch's
    # best * (1 + threshold) would take any value above -110 for an improvement over -100).
    s = schedule(threshold=0.01, threshold_mode="rel", patience=2)
    s.step(-100.0)
    s.step(-99.5)  # +0.5 < 1.0 = 0.01 x 100
    assert s.best == -100.0 and s.bad_evals == 1
    s.step(-98.9)  # +1.1 > 1.0
    assert s.best == -98.9 and s.bad_evals == 0
    s.step(-98.0)  # +0.9 < 0.989
    assert s.step(-98.5) is not None and s.budget == 4.0
    with pytest.raises(ValueError):
        schedule(threshold_mode="relative")


def test_floor_holds():
    s = schedule(budget=8.0, min_budget=1.5, patience=1)
    s.step(-10.0)
    budgets = []
    for _ in range(10):
        s.step(-10.0)
        budgets.append(s.budget)
    assert budgets[:3] == [4.0, 2.0, 1.5] and min(budgets) == 1.5 and budgets[-1] == 1.5
    assert s.per_group == 1.5 / 4


def test_floor_zero_reaches_zero_below_the_per_group_cutoff():
    s = schedule(budget=8.0, num_groups=4, min_budget=0.0, patience=1)  # 2 nats per group
    s.step(-10.0)
    budgets = []
    for _ in range(12):
        s.step(-10.0)
        budgets.append(s.budget)
    # 2, 1, ..., 0.0625 per group; the next, 0.03125, is below ZERO_BELOW = 0.05: zero, and it stays.
    assert budgets[:6] == [4.0, 2.0, 1.0, 0.5, 0.25, 0.0] and budgets[-1] == 0.0
    assert FreeBitsSchedule.ZERO_BELOW == 0.05
    assert all(b / 4 >= FreeBitsSchedule.ZERO_BELOW or b == 0.0 for b in budgets)


def test_state_dict_round_trip_mid_plateau():
    s = schedule(patience=3)
    s.step(-20.0)
    s.step(-19.99)
    s.step(-19.98)  # two bad evaluations: one more drops the budget
    saved = s.state_dict()
    assert saved == {"budget": 8.0, "best": -20.0, "bad_evals": 2}
    restored = schedule(patience=3, budget=30.0)  # the run's starting budget, replaced by the saved one
    restored.load_state_dict(saved)
    assert restored.state_dict() == saved
    assert restored.step(-19.97) is not None and restored.budget == 4.0
    assert s.step(-19.97) is not None and s.state_dict() == restored.state_dict()


def test_factor_zero_goes_straight_to_the_floor():
    s = FreeBitsSchedule(budget=30.0, num_groups=13, patience=1, factor=0.0, min_budget=0.0)
    s.step(-10.0)
    s.step(-10.0)
    assert s.budget == 0.0  # the binary-image preset's lambda = 0 fine-tuning
    s = FreeBitsSchedule(budget=30.0, num_groups=13, patience=1, factor=0.0, min_budget=2.0)
    s.step(-10.0)
    s.step(-10.0)
    assert s.budget == 2.0


@pytest.mark.parametrize("budget", [0.0])
def test_zero_budget_never_changes(budget):
    s = FreeBitsSchedule(budget=budget, num_groups=3, patience=1)
    for _ in range(5):
        assert s.step(-1.0) is None
    assert s.budget == 0.0
