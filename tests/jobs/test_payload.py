"""The recipe-to-worker contract: every recipe's ``prepare`` returns a typed ``Payload`` with its declared extras."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jobs.recipes import RECIPES
from jobs.recipes.base import Payload, Recipe, Streamed


def _arrays(n: int, shape: tuple[int, ...] = (1, 4, 4)) -> dict[str, np.ndarray]:
    return {"x": np.zeros((n, *shape), np.uint8), "y": np.zeros(n, np.int64)}


def test_input_shape_is_read_from_the_training_images_and_survives_streaming():
    payload = Payload(train=_arrays(3, (3, 8, 8)), val=_arrays(0, (3, 8, 8)), test=_arrays(2, (3, 8, 8)),
                      class_names=["a", "b"])
    assert payload.input_shape == (3, 8, 8) and payload.in_chans == 3 and payload.num_classes == 2
    payload.set_split("train", Streamed(3))
    assert payload.in_chans == 3


def test_splits_are_named_and_missing_or_streamed_ones_are_clear_errors():
    payload = Payload(train=_arrays(3), val=_arrays(1), test=_arrays(1))
    with pytest.raises(KeyError, match="unknown payload split 'pool'"):
        payload.split("pool")
    with pytest.raises(KeyError, match="no 'unlabeled' split"):
        payload.split("unlabeled")
    payload.unlabeled = Streamed(100)
    with pytest.raises(TypeError, match="'unlabeled' is streamed"):
        payload.arrays("unlabeled")
    with pytest.raises(ValueError, match="no input_shape"):
        _ = Payload(train=Streamed(5), val=_arrays(1), test=_arrays(1)).in_chans


@dataclasses.dataclass(frozen=True)
class _Extras:
    k: int


def test_a_recipe_checks_the_kind_of_extras_its_prepare_returns():
    typed = Recipe(params=RECIPES["probe"].params, prepare=lambda c, p: None, build_task=lambda c, p, d: None,
                   extras=_Extras)
    typed.check_payload(Payload(train=_arrays(1), val=_arrays(1), test=_arrays(1), extras=_Extras(1)))
    with pytest.raises(TypeError, match="extras must be _Extras, got NoneType"):
        typed.check_payload(Payload(train=_arrays(1), val=_arrays(1), test=_arrays(1)))
    with pytest.raises(TypeError, match="declares none"):
        RECIPES["probe"].check_payload(Payload(train=_arrays(1), val=_arrays(1), test=_arrays(1), extras=_Extras(1)))
    with pytest.raises(TypeError, match="not a Payload"):
        RECIPES["probe"].check_payload({"train": _arrays(1)})  # type: ignore[arg-type]


def test_recipes_declare_frozen_extras():
    for name, recipe in RECIPES.items():
        if recipe.extras is not None:
            assert dataclasses.is_dataclass(recipe.extras), name
            assert recipe.extras.__dataclass_params__.frozen, name  # type: ignore[attr-defined]


def test_a_recipe_is_trainable_or_names_its_evaluation_job():
    params, prepare = RECIPES["probe"].params, RECIPES["probe"].prepare
    with pytest.raises(TypeError, match="exactly one of them"):
        Recipe(params=params, prepare=prepare, build_task=None)
    with pytest.raises(TypeError, match="exactly one of them"):
        Recipe(params=params, prepare=prepare, build_task=RECIPES["probe"].build_task, evaluated_by="jobs.x")
    assert not Recipe(params=params, prepare=prepare, build_task=None, evaluated_by="jobs.x").trainable

