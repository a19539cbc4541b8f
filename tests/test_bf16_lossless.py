"""Lossless in the dtype users run: every lossless strategy, with the shipped demo models in bfloat16, reproduces
its reference token for token (greedy autoregressive decoding; dllm_static for FreeDave; the same rule without
End-of-Text Prediction for EoTP).

In bfloat16 a verification forward over more tokens (or FreeDave's draft rows) can round differently from the
reference's forwards where XLA:CPU reduces differently for another shape, so token identity holds while no
decision of the reference is a near-tie at that discrepancy (README, diffusion section); these prompts decode
identically in every strategy and cache mode."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jspec
from conftest import assert_end_of_text_changes_no_token, line_break_tokens
from jspec.strategies.auto_depth import StepCosts

CODE = [
    "class LRUCache:\n    def __init__(self, capacity):\n        self.capacity = capacity\n",
    "import os\nimport sys\n\n\ndef main(",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.",
    "def read_lines(path):\n    with open(path) as f:\n        return",
]


@pytest.fixture(scope="module")
def demo_pair():
    return jspec.load("demo-code", dtype="bfloat16"), jspec.load("demo-code-draft", dtype="bfloat16")


@pytest.fixture(scope="module")
def greedy_reference(demo_pair):
    target, _ = demo_pair
    return jspec.decode(target, CODE, max_new_tokens=32, stop_tokens=[]).sequences()


@pytest.mark.parametrize("strategy, options", [
    ("speculative", dict(num_draft_tokens=4)),
    ("speculative", dict(tree=(2, 2, 1))),
    ("prompt_lookup", dict(num_draft_tokens=4)),
    ("self_speculative", dict(skip_layers=(1,), num_draft_tokens=3)),
    ("jacobi", dict(num_draft_tokens=4)),
    ("lookahead", dict(window=4, ngram_size=3, guess_set_size=3)),
    ("sjd", dict(num_draft_tokens=4, temperature=0.0)),  # greedy SJD is Jacobi decoding
], ids=["chain", "tree", "prompt_lookup", "layer_skip", "jacobi", "lookahead", "sjd_greedy"])
def test_speculative_family_equals_greedy_in_bfloat16(demo_pair, greedy_reference, strategy, options):
    target, draft = demo_pair
    if strategy == "speculative":
        options = dict(options, draft=draft)
    got = jspec.decode(target, CODE, strategy, max_new_tokens=32, stop_tokens=[], **options)
    assert got.sequences() == greedy_reference


@pytest.mark.parametrize("step_costs, plain", [([1.0, 1.3, 1.5, 1.7, 1.9], False), ([1.0, 2.5, 3.0, 3.5, 4.0], True)],
                         ids=["drafting", "plain_steps_and_probes"])
def test_auto_depth_equals_greedy_in_bfloat16(demo_pair, greedy_reference, step_costs, plain):
    """num_draft_tokens="auto" under given step costs (deterministic: nothing timed): cheap drafts make it draft,
    dear ones make every step a plain autoregressive step with probes; both reproduce greedy decoding in bf16."""
    target, draft = demo_pair
    costs = StepCosts(jnp.asarray(step_costs, jnp.float32), jnp.float32(1.3))
    got = jspec.decode(target, CODE, "speculative", draft=draft, num_draft_tokens="auto", step_costs=costs,
                       max_new_tokens=32, stop_tokens=[])
    assert got.sequences() == greedy_reference
    depths = np.asarray(got.stats["depth_histogram"])
    if plain:
        assert depths[1:].sum() == 0 and int(got.stats["probes"]) > 0
    else:
        assert depths[1:].sum() > 0


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_freedave_equals_static_in_the_shipped_bfloat16(cache):
    dllm = jspec.load("demo-code-dllm")
    assert dllm.config.dtype == "bfloat16"  # as shipped
    options = dict(max_new_tokens=32, block_size=16, cache=cache)
    static = jspec.decode(dllm, CODE, "dllm_static", **options)
    free = jspec.decode(dllm, CODE, "freedave", draft_steps=4, **options)
    assert free.sequences() == static.sequences()
    assert int(free.stats["model_calls"]) < int(static.stats["model_calls"])


@pytest.mark.parametrize("name, strategy, options", [
    ("demo-code-dllm", "dllm_threshold", dict(threshold=0.7, cache="dual", block_size=16)),  # several per forward
    ("demo-code-dllm", "freedave", dict(draft_steps=3, cache="prefix", block_size=16)),  # drafted branches
    ("demo-code-bd", "block_diffusion", dict(threshold=0.9, cache="sub_block")),
], ids=["threshold-dual", "freedave-prefix", "block-diffusion"])
def test_end_of_text_prediction_changes_no_token_in_the_shipped_bfloat16(name, strategy, options):
    """EoTP ends a row once its decided prefix holds a stop token (here every token with a line break: rows stop
    at the end of their first line) and skips the rest of the block: the same tokens and finish reasons as
    end_of_text=False, fewer forwards (tests/test_learn2pd.py: static, threshold and block_diffusion in float32 on
    held-out prompts)."""
    model = jspec.load(name)
    options = dict(options, max_new_tokens=32, stop_tokens=line_break_tokens(model))
    plain = jspec.decode(model, CODE, strategy, end_of_text=False, **options)
    early = jspec.decode(model, CODE, strategy, end_of_text=True, **options)
    assert np.any(np.asarray(plain.lengths) < 32)  # rows stop at a line break
    assert_end_of_text_changes_no_token(plain, early)
