"""The default recipe's evaluation schedule."""

from pretrain.train.recipe import load_recipe


def test_the_tiny_recipe_evaluates_several_times_during_its_run():
    # the loop evaluates every eval.every steps before the last one, and at the last one
    recipe = load_recipe("tiny_synthetic")
    every, last = recipe.eval.every, recipe.schedule.max_steps
    steps = [s for s in range(1, last) if every and s % every == 0] + [last]
    assert len(steps) >= 4, steps  # each eval/* chart a curve, not one dot
    assert steps[0] <= last // 4  # the first point early enough to show the start of learning
