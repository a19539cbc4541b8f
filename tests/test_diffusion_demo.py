"""The shipped diffusion demo models: loadable by name, and the lossless / exactness guarantees on real weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import jspec
from jspec import cli

ASSETS = Path(__file__).resolve().parents[1] / "jspec" / "assets"
pytestmark = pytest.mark.skipif(
    not all((ASSETS / name / "config.json").is_file() for name in ("demo-code-dllm", "demo-code-bd")),
    reason="diffusion demo models not built",
)

PROMPTS = [
    "import os\nimport sys\n\n\ndef main(",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.",
    "def read_lines(path):\n    with open(path) as f:\n        return",
]


@pytest.fixture(scope="module")
def dllm() -> jspec.Model:
    return jspec.load("demo-code-dllm", dtype="float32")


@pytest.fixture(scope="module")
def block_model() -> jspec.Model:
    return jspec.load("demo-code-bd", dtype="float32")


def test_diffusion_demo_models_load_by_name_with_their_mask_token():
    for name, kind in (("demo-code-dllm", "masked"), ("demo-code-bd", "block")):
        model = jspec.load(name)
        assert model.config.diffusion == kind and model.config.shifted_logits
        assert model.config.mask_token_id == model.tokenizer.token_to_id("<|mask|>")
        assert model.config.vocab_size == jspec.load("demo-code").config.vocab_size + 1
    assert jspec.load("demo-code-bd").config.diffusion_block_size == 32


def test_freedave_equals_static_on_the_demo_model_with_fewer_forwards(dllm):
    options = dict(max_new_tokens=32, block_size=16)
    static = jspec.decode(dllm, PROMPTS, "dllm_static", **options)
    for draft_steps in (2, 4):
        free = jspec.decode(dllm, PROMPTS, "freedave", draft_steps=draft_steps, **options)
        assert free.sequences() == static.sequences()
        assert int(free.stats["model_calls"]) < int(static.stats["model_calls"])
    threshold_one = jspec.decode(dllm, PROMPTS, "dllm_threshold", threshold=1.0, cache="dual", **options)
    static_dual = jspec.decode(dllm, PROMPTS, "dllm_static", cache="dual", **options)
    assert threshold_one.sequences() == static_dual.sequences()


def test_block_diffusion_cache_equals_no_cache_on_the_demo_model(block_model):
    options = dict(max_new_tokens=40, threshold=0.9, sub_block_size=8)
    uncached = jspec.decode(block_model, PROMPTS, "block_diffusion", cache="none", **options)
    cached = jspec.decode(block_model, PROMPTS, "block_diffusion", cache="block", **options)
    assert cached.sequences() == uncached.sequences()
    assert np.all(np.asarray(cached.lengths) == 40)


def test_cli_decodes_with_the_diffusion_models(capsys):
    assert cli.main(["generate", "--model", "demo-code-dllm", "--strategy", "freedave", "--draft-steps", "2", "--block-size", "16",
                     "--max-new-tokens", "16", "--prompt", "import os\n", "--dtype", "float32"]) == 0
    assert cli.main(["generate", "--model", "demo-code-bd", "--strategy", "block_diffusion", "--threshold", "0.8",
                     "--diffusion-cache", "sub_block", "--max-new-tokens", "16", "--prompt", "import os\n", "--json"]) == 0
    assert "model_calls" in capsys.readouterr().out
