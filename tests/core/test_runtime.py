"""core.runtime: glibc keeps a network's large buffers between calls, so repeated calls take no fresh pages from the
kernel; every process that builds a Predictor or trains gets it. Page faults are counted, never time."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import core.runtime as runtime
from core.models import create_model
from core.predict import Predictor
from core.runtime import OPT_OUT_ENV, tune_allocator
from core.train import TrainConfig, fit

REPO_ROOT = Path(__file__).resolve().parents[2]
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc malloc's")

# Repeated batched forward passes of a small network in a fresh process; prints whether the allocator was tuned and
# the minor page faults of each call after the first two (the heap may still grow on the second call). Each activation
# is 4 x 16 x 384 x 384 float32 = 36 MiB, above the 32 MiB that glibc's own threshold reaches at most, so by default
# each is mapped and unmapped per call.
_FORWARD = """
import json, resource, sys
import torch
from torch import nn
from core import runtime

if sys.argv[1] == "predictor":
    from core.predict import Predictor
    from core.models import create_model
    config = {"modality": "FL", "image_size": 32, "architecture": "tiny_cnn"}
    Predictor(create_model("tiny_cnn", in_chans=1), config, 0.5, device="cpu")
else:
    runtime.tune_allocator()
torch.set_num_threads(1)
model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Sigmoid()).eval()
x = torch.randn(4, 1, 384, 384)
faults = []
with torch.inference_mode():
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": runtime.tune_allocator(), "faults": faults[2:]}))
"""


def _clean_environment(**extra: str) -> dict[str, str]:
    """This environment without anything that sets glibc's thresholds or opts out, plus ``extra``."""
    names = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", OPT_OUT_ENV)
    return {key: value for key, value in os.environ.items() if key not in names} | extra


@pytest.fixture
def undecided(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A process whose allocator is not decided yet (restored afterwards); counts the decisions taken."""
    decisions: list[int] = []
    decide = runtime._set_thresholds
    monkeypatch.setattr(runtime, "_tuned", None)
    monkeypatch.setattr(runtime, "_set_thresholds", lambda: decisions.append(1) or decide())
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", OPT_OUT_ENV):
        monkeypatch.delenv(name, raising=False)
    return decisions


@needs_glibc
def test_tune_allocator_sets_the_thresholds_once_from_any_number_of_threads(undecided):
    answers: list[bool] = []
    threads = [threading.Thread(target=lambda: answers.append(tune_allocator())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [True] * 8 and tune_allocator() is True
    assert undecided == [1]


def test_tune_allocator_does_nothing_on_other_c_libraries(undecided, monkeypatch):
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda *args, **kwargs: ("", ""))
    assert tune_allocator() is False and tune_allocator() is False
    assert undecided == [1]


@pytest.mark.parametrize(
    ("name", "value"),
    [(OPT_OUT_ENV, "0"), ("MALLOC_MMAP_THRESHOLD_", "131072"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")],
)
def test_the_environment_can_keep_glibcs_thresholds(undecided, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert tune_allocator() is False


@needs_glibc
def test_repeated_batched_calls_take_far_fewer_page_faults_once_tuned():
    """Three fresh processes at once: glibc's defaults (opted out), tune_allocator(), and a Predictor built first."""
    arms = {
        "default": _clean_environment(**{OPT_OUT_ENV: "0"}),
        "tuned": _clean_environment(),
        "predictor": _clean_environment(),
    }
    started = {
        arm: subprocess.Popen(
            [sys.executable, "-c", _FORWARD, arm], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        for arm, env in arms.items()
    }
    results = {}
    for arm, process in started.items():
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0, arm
        results[arm] = json.loads(out.strip().splitlines()[-1])
    default = results["default"]
    assert default["tuned"] is False
    assert min(default["faults"]) > 10_000  # each call maps its activations afresh: about 37,000 pages
    for arm in ("tuned", "predictor"):
        assert results[arm]["tuned"] is True, arm
        # steady state: calls take (almost) nothing fresh from the kernel; the heap may still grow once early on,
        # so all the measured calls together take less than one call does with glibc's defaults
        faults = sorted(results[arm]["faults"])
        assert faults[len(faults) // 2] < min(default["faults"]) / 20, (arm, results[arm], default)
        assert sum(faults) < min(default["faults"]), (arm, results[arm], default)


def test_predictor_and_training_tune_the_allocator(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr("core.predict.tune_allocator", lambda: calls.append("predictor") or True)
    monkeypatch.setattr("core.train.recipe.tune_allocator", lambda: calls.append("fit") or True)
    config = {"modality": "FL", "image_size": 32, "architecture": "tiny_cnn"}
    Predictor(create_model("tiny_cnn", in_chans=1), config, 0.5, device="cpu")
    assert calls == ["predictor"]
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 32, 32, generator=generator), torch.tensor([0, 1] * 4, dtype=torch.float32)
    fit(TrainConfig(architecture="tiny_cnn", image_size=32, epochs=1, batch_size=4, device="cpu"), x, y, x, y)
    assert calls == ["predictor", "fit"]
