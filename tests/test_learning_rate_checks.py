"""A negative or non-finite learning rate fails at construction, every alias."""

import math

import optax
import pytest

import htmuon_jax

BAD = [-0.01, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("name", sorted(htmuon_jax.ALIASES))
@pytest.mark.parametrize("lr", BAD)
def test_bad_learning_rate_raises_naming_it(name, lr):
  alias = htmuon_jax.ALIASES[name]
  with pytest.raises(ValueError, match=r"^learning_rate must be"):
    alias(lr)


@pytest.mark.parametrize("name", sorted(htmuon_jax.ALIASES))
def test_bad_adam_learning_rate_raises_naming_it(name):
  alias = htmuon_jax.ALIASES[name]
  with pytest.raises(ValueError, match=r"^adam_learning_rate must be"):
    alias(0.01, adam_learning_rate=-1e-3)


@pytest.mark.parametrize("name", sorted(htmuon_jax.ALIASES))
def test_schedule_checked_at_step_zero(name):
  alias = htmuon_jax.ALIASES[name]
  bad = optax.linear_schedule(-0.1, 0.0, 10)
  with pytest.raises(ValueError, match=r"learning_rate .*at step 0"):
    alias(bad)
  alias(optax.linear_schedule(0.0, 0.02, 10))  # warm-up from 0 is fine


@pytest.mark.parametrize("name", sorted(htmuon_jax.ALIASES))
def test_zero_and_positive_learning_rates_build(name):
  htmuon_jax.ALIASES[name](0.0)
  htmuon_jax.ALIASES[name](0.02, adam_learning_rate=3e-4)
