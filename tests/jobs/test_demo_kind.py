"""The demo job kind checks the FL-CNN's settings (issue 17) before a build starts."""

from __future__ import annotations

import pytest

from services.jobs.kinds import KINDS


def check(params: dict) -> dict:
    return KINDS["demo"].check(dict(params))[1]


def test_fl_settings_are_checked_and_kept() -> None:
    params = check(
        {
            "part": "fl",
            "fl_architecture": "resnet18",
            "fl_model_options": [["output_stride", 16], ["pool", "max"]],
            "fl_augment": False,
            "fl_epochs": 3,
            "confounders": 1,
            "fl_seed": 0,
        }
    )
    assert params == {
        "part": "fl",
        "fl_architecture": "resnet18",
        "fl_model_options": [["output_stride", 16], ["pool", "max"]],
        "fl_augment": False,
        "fl_epochs": 3,
        "confounders": 1.0,
        "fl_seed": 0,
    }
    assert check({"part": "fl", "fl_seed": None})["fl_seed"] is None  # the demo's seed


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"fl_architecture": "efficientnet_b0", "fl_model_options": [["output_stride", 12]]}, "output_stride"),
        ({"fl_model_options": [["stem_stride", 3]]}, "stem_stride must be 1 or 2"),  # the demo's flmil
        ({"fl_model_options": [["output_stride", 16]]}, "flmil has no option 'output_stride'"),
        ({"fl_architecture": "tiny_cnn", "fl_model_options": [["output_stride", 16]]}, "no option 'output_stride'"),
        ({"fl_model_options": "output_stride=16"}, "[name, value] pairs"),
        ({"fl_model_options": [["output_stride"]]}, "[name, value] pairs"),
        ({"fl_augment": "no"}, "true or false"),
        ({"fl_architecture": "vgg99"}, "unknown fl architecture 'vgg99'"),
        ({"fl_architecture": "resnet18", "fl_model_options": [["pool", "mean"]]}, "pool must be one of avg, max"),
        ({"confounders": -1}, "confounders must be a number from 0"),
        ({"confounders": "all"}, "confounders must be a number from 0"),
        ({"confounders": True}, "confounders must be a number from 0"),
        ({"fl_seed": -1}, "fl_seed must be between 0"),
        ({"fl_seed": "one"}, "fl_seed must be a whole number"),
    ],
)
def test_bad_fl_settings_are_refused_with_what_to_change(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check({"part": "fl", **params})
