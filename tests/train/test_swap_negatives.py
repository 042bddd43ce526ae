"""data.swap_negatives in the recipe: parsed from YAML and the command line, checked before any rank starts."""

import pytest

from data_pipeline import DataError
from pretrain.train.cli import parse_args
from pretrain.train.preflight import prepare
from pretrain.train.recipe import RecipeError, load_recipe
from tests.helpers.jobs import recipe_flags


@pytest.fixture
def base_flags(synthetic_shards, tokenizer_dir, tmp_path):
    return recipe_flags(synthetic_shards, tokenizer_dir, tmp_path)


def _prepare_error(flags: list[str]) -> str:
    with pytest.raises((RecipeError, DataError)) as err:
        prepare(parse_args(flags))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_swap_negatives_are_the_default_shapes_and_parsed_from_the_command_line(base_flags):
    assert load_recipe("tiny_synthetic").data.swap_negatives == [["circle", "square", "triangle", "diamond"]]
    off = parse_args(["--recipe", "tiny_synthetic", "--data.swap_negatives", "[]"])
    assert load_recipe(off.recipe, off).data.swap_negatives == []
    args = parse_args(["--recipe", "tiny_synthetic", "--data.swap_negatives", "[[circle, square], [red, blue]]"])
    assert load_recipe(args.recipe, args).data.swap_negatives == [["circle", "square"], ["red", "blue"]]
    setup = prepare(parse_args(base_flags + ["--data.swap_negatives", "[[circle, square, triangle, diamond]]"]))
    assert setup.recipe.data.swap_negatives == [["circle", "square", "triangle", "diamond"]]


def test_unusable_swap_negatives_are_one_error_before_any_rank_starts(base_flags):
    flag = "--data.swap_negatives"
    assert _prepare_error(base_flags + [flag, "[circle, square]"]) == (
        "recipe key data.swap_negatives must be list[list[str]], got ['circle', 'square']: fix the value in the "
        "recipe or on the command line")
    assert _prepare_error(base_flags + [flag, "[[circle]]"]) == (
        "swap group ['circle'] needs at least two words: give each group two or more distinct words in "
        "data.swap_negatives")
    assert _prepare_error(base_flags + [flag, "[[circle, square], [square, red]]"]) == (
        "swap word 'square' is in two groups: keep it in one of data.swap_negatives")
