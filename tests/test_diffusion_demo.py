"""The shipped diffusion demo models: loadable by name, and the exactness guarantees on real weights (FreeDave ==
dllm_static on demo-code-dllm in its shipped bfloat16, every cache mode: test_bf16_lossless.py)."""

from __future__ import annotations

import json
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

CARD_MARGIN = 2e-3  # nats: the same computation as the card's; only the backend's summation order may differ

PROMPTS = [
    "import os\nimport sys\n\n\ndef main(",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.",
    "def read_lines(path):\n    with open(path) as f:\n        return",
]


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


def _card_table_rows(card: str, model_name: str) -> dict[str, list[str]]:
    """The decoding table's rows of `model_name` on the model card: label -> [tokens per forward, agreement %]."""
    rows = {}
    for line in card.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] == f"`{model_name}`":
            rows[cells[1]] = cells[2:]
    return rows


@pytest.mark.parametrize("name", ["demo-code-dllm", "demo-code-bd"])
def test_diffusion_demos_reach_the_model_card_decoding_figures(name):
    """Tokens per forward and agreement with one-token-per-forward decoding on the held-out prompts: the card's."""
    from jspec.train import demo

    card = (ASSETS / "MODEL_CARD.md").read_text()
    stated = _card_table_rows(card, name)
    measured = demo.decoding_figures(jspec.load(name, dtype="float32"), name)
    assert set(stated) == set(measured) == {label for label, _, _ in demo.DECODING_SETTINGS[name]}
    for label, figure in measured.items():
        assert f"{figure['tokens_per_forward']:.2f}" == stated[label][0], label
        assert 100 * figure["agreement"] == pytest.approx(float(stated[label][1].rstrip("%")), abs=0.1), label


def test_diffusion_demos_reach_the_model_card_heldout_loss():
    """The card's held-out loss of each shipped diffusion demo on its bf16 weights (first windows of the held-out
    slice), re-measured with its run's objective, key and batch size; and the run's full-slice figure is on the card."""
    from jspec.train import demo
    from test_train import _card_row

    card = (ASSETS / "MODEL_CARD.md").read_text()
    names = ("demo-code-dllm", "demo-code-bd")
    full = dict(zip(names, _card_row(card, "Held-out loss (nats/token)")))
    stated = dict(zip(names, _card_row(card, f"Held-out loss, shipped weights, first {demo.HELDOUT_CHECK_WINDOWS} windows")))
    for name in names:
        recipe = json.loads((ASSETS / name / "training_recipe.json").read_text())
        result = json.loads((ASSETS / name / "training_result.json").read_text())
        assert full[name] == pytest.approx(result["eval_loss"], abs=5e-4)
        assert demo.shipped_heldout_loss(jspec.load(name), recipe) == pytest.approx(stated[name], abs=CARD_MARGIN), name
