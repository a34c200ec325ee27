import math

import pytest

from bt_fast.schedule import learning_rate

STEPS, EPOCHS, BATCH = 100, 1000, 2048  # base lr = 2048 / 256 = 8


def test_warmup_starts_at_zero_and_reaches_base():
    assert learning_rate(0, STEPS, EPOCHS, BATCH) == 0.0
    assert learning_rate(5 * STEPS, STEPS, EPOCHS, BATCH) == pytest.approx(4.0)
    assert learning_rate(10 * STEPS, STEPS, EPOCHS, BATCH) == pytest.approx(8.0)


def test_cosine_decays_to_one_thousandth_of_base():
    assert learning_rate(EPOCHS * STEPS, STEPS, EPOCHS, BATCH) == pytest.approx(8.0 * 0.001)
    middle = (10 * STEPS + EPOCHS * STEPS) // 2
    assert learning_rate(middle, STEPS, EPOCHS, BATCH) == pytest.approx(0.5 * 8.0 + 0.5 * 0.008)


def test_cosine_formula_at_an_arbitrary_step():
    step = 23_456
    q = 0.5 * (1 + math.cos(math.pi * (step - 1000) / (100_000 - 1000)))
    assert learning_rate(step, STEPS, EPOCHS, BATCH) == pytest.approx(8.0 * q + 0.008 * (1 - q))
