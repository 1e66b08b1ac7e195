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
        }
    )
    assert params == {
        "part": "fl",
        "fl_architecture": "resnet18",
        "fl_model_options": [["output_stride", 16], ["pool", "max"]],
        "fl_augment": False,
        "fl_epochs": 3,
        "confounders": 1.0,
    }


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"fl_model_options": [["output_stride", 12]]}, "output_stride"),
        ({"fl_architecture": "tiny_cnn", "fl_model_options": [["output_stride", 16]]}, "no option 'output_stride'"),
        ({"fl_model_options": "output_stride=16"}, "[name, value] pairs"),
        ({"fl_model_options": [["output_stride"]]}, "[name, value] pairs"),
        ({"fl_augment": "no"}, "true or false"),
        ({"fl_architecture": "vgg99"}, "unknown fl architecture 'vgg99'"),
        ({"fl_model_options": [["pool", "mean"]]}, "pool must be one of avg, max"),
        ({"confounders": -1}, "confounders must be a number from 0"),
        ({"confounders": "all"}, "confounders must be a number from 0"),
        ({"confounders": True}, "confounders must be a number from 0"),
    ],
)
def test_bad_fl_settings_are_refused_with_what_to_change(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check({"part": "fl", **params})
