"""Speculative decoding on the shipped demo pair: token-identical to autoregressive greedy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jspec

CODE = [
    "import os\nimport sys\n\n\ndef main(argv):\n    ",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "def fib(n):\n    if n < 2:\n        return n\n",
    "for i in range(10):\n    print(i)\n",
    "    def __repr__(self):\n        return '%s(%r)' % (self.__class__.__name__, ",
    "try:\n    import _thread\nexcept ImportError:\n",
    "if __name__ == '__main__':\n",
    "# Copyright 2001 Python Software Foundation\n\"\"\"Utilities for ",
]


@pytest.fixture(scope="module")
def demo():
    target, draft = jspec.load("demo-code"), jspec.load("demo-code-draft")
    prompts = [target.tokenizer.encode(text) for text in CODE]
    return target, draft, prompts


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 8),
    drafter=st.sampled_from(["chain", "tree", "prompt_lookup", "layer_skip"]),
    depth=st.integers(2, 6),
    adaptive=st.booleans(),
)
def test_demo_pair_greedy_equals_autoregressive(demo, batch, drafter, depth, adaptive):
    target, draft, prompts = demo
    rows = prompts[:batch]
    options = {
        "chain": dict(strategy="speculative", draft=draft, num_draft_tokens=depth, adaptive=adaptive),
        "tree": dict(strategy="speculative", draft=draft, tree=(2,) + (1,) * (depth - 1), adaptive=adaptive),
        "prompt_lookup": dict(strategy="prompt_lookup", num_draft_tokens=depth, adaptive=adaptive),
        "layer_skip": dict(strategy="self_speculative", skip_layers=(1,), num_draft_tokens=depth, adaptive=adaptive),
    }[drafter]
    want = jspec.decode(target, rows, max_new_tokens=24, stop_tokens=[])
    got = jspec.decode(target, rows, max_new_tokens=24, stop_tokens=[], **options)
    assert got.sequences() == want.sequences()
    if drafter in ("chain", "tree"):  # the trained draft agrees with the target often enough to save calls
        assert got.stats["model_calls"] < want.stats["model_calls"]


def test_demo_completes_code_with_the_draft(demo):
    target, draft, _ = demo
    out = jspec.decode(target, CODE[2], "speculative", draft=draft, num_draft_tokens=4, max_new_tokens=32)
    assert out.text[0] and np.mean(out.stats["mean_accepted_length"]) > 1.0
