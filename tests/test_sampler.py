"""clo_fast.training.sampler."""

from __future__ import annotations


def test_sampler_covers_each_epoch_once_and_is_layout_independent():
    from clo_fast.training.sampler import StepSampler

    n = 37
    two = StepSampler(n, micro=2, accumulation_steps=2, world=2, seed=5)
    one = StepSampler(n, micro=2, accumulation_steps=4, world=1, seed=5)
    assert two.steps_per_epoch == one.steps_per_epoch == 4
    seen = []
    for s in range(4):
        g2 = [i for m in range(2) for r in range(2) for i in two.indices(s, m, r)]
        g1 = [i for m in range(4) for i in one.indices(s, m, 0)]
        assert g1 == g2
        seen += g2
    assert len(set(seen)) == 32  # no repeats within an epoch
    assert two.indices(4, 0, 0) != two.indices(0, 0, 0)  # a new permutation next epoch
