import pytest
import torch


@pytest.fixture(autouse=True)
def _global_rng_from_a_fixed_state():
    """Every model test starts from the same global RNG state and leaves the state it found. The tests seed
    what they rely on themselves (their tensors from their own generators); this covers the draws a test
    cannot reach (ITM negatives inside a forward, a module's default init), so no result depends on which
    tests ran before, and no model test shifts the draws of the tests after it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield
