"""Data-parallel training (`train(..., mesh=)`, `jspec train --mesh data=N`). On 4 CPU devices (a subprocess with
JAX_NUM_CPU_DEVICES=4; this process keeps its one device): the per-step losses equal one device's within 1e-5 in
float32, the final parameters agree, the batch is split over "data" and the state replicated, checkpoints of the
sharded run load and resume on one device, and bad meshes are refused naming the numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jspec.checkpoint import orbax_store
from jspec.cli import main
from jspec.sharding import make_mesh
from jspec.train.trainer import training_mesh
from jspec.validation import ArgumentError

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5
LOSS_TOLERANCE = 1e-5  # float32; only the order of the gradient and loss sums differs
PARAM_TOLERANCE = 1e-5

# Runs with 4 CPU devices: one-device and data=4 training of the same recipe, the CLI path stopped at step 2 and
# resumed on the mesh up to step 3 (the parent resumes it on one device), and the refusals; prints one JSON line last.
SCRIPT = r"""
import contextlib, io, json, sys
from pathlib import Path

import jax

from jspec.cli import main
from jspec.sharding import make_mesh
from jspec.train import Trainer, corpus, train
from jspec.validation import ArgumentError
from test_train import make_corpus_root, make_prepared, make_tokenizer, tiny_recipe, write_cli_recipe

tmp, steps = Path(sys.argv[1]), int(sys.argv[2])
assert jax.device_count() == 4, jax.devices()
manifest = corpus.build_manifest(make_corpus_root(tmp / "stdlib"), heldout_fraction=0.2)
tokenizer = make_tokenizer(manifest)
prepared = make_prepared(manifest, tokenizer)
quiet = lambda line: None
recipe = lambda name, **kw: tiny_recipe(tmp / name, steps=steps, heldout_fraction=0.2, **kw)
report = {}

train(recipe("one"), data=prepared, log=quiet)
mesh = make_mesh(data=4)
trainer = Trainer(recipe("four"), prepared, mesh)
report["batch_spec"] = list(trainer.place_tokens(trainer.batches.batch(0)).sharding.spec)
state, _ = trainer.step(trainer.init_state())
report["state_replicated_on"] = sorted({len(leaf.sharding.device_set) for leaf in jax.tree.leaves(state)
                                        if leaf.sharding.is_fully_replicated})
report["state_not_replicated"] = sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state))
train(recipe("four"), data=prepared, mesh=mesh, log=quiet)

cli_recipe = write_cli_recipe(tmp / "cli", manifest, tokenizer, steps=steps)
with contextlib.redirect_stderr(io.StringIO()):
    cli_run = ["train", "--recipe", cli_recipe, "--out", str(tmp / "cli" / "run"), "--mesh", "data=4"]
    report["cli_status"] = main(cli_run + ["--stop-at", "2"]), main(cli_run + ["--stop-at", "3", "--resume"])
    bad = io.StringIO()
    with contextlib.redirect_stderr(bad):
        report["cli_bad_status"] = main(["train", "--recipe", cli_recipe, "--out", str(tmp / "cli" / "bad"),
                                         "--batch-size", "6", "--mesh", "data=4"])
report["cli_bad_error"] = bad.getvalue()
report["errors"] = []
for mesh_text, batch_size in (("data=4", 6), ("data=2,model=2", 4)):
    try:
        train(recipe("refused", batch_size=batch_size), data=prepared, mesh=mesh_text, log=quiet)
    except ArgumentError as error:
        report["errors"].append(str(error))
report["refused_wrote_nothing"] = not (tmp / "refused").exists()
print(json.dumps(report))
"""


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("sharded")
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp), str(STEPS)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return tmp, json.loads(done.stdout.strip().splitlines()[-1])


def test_data_parallel_losses_and_params_equal_one_device(four_devices):
    tmp, report = four_devices
    assert report["batch_spec"] == ["data"]
    assert report["state_replicated_on"] == [4] and report["state_not_replicated"] == 0
    one, four = _losses(tmp / "one" / "run"), _losses(tmp / "four" / "run")
    assert len(one) == len(four) == STEPS
    np.testing.assert_allclose(four, one, rtol=0, atol=LOSS_TOLERANCE)
    # The final models, saved by the 4-device process, load here on one device and agree.
    single, sharded = orbax_store.restore(tmp / "one" / "run" / "model"), orbax_store.restore(tmp / "four" / "run" / "model")
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=PARAM_TOLERANCE)
    param_difference = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                           for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)))
    print(f"data=4 vs one device, {STEPS} fp32 steps: max |loss difference| {np.max(np.abs(np.subtract(four, one))):.3g}, "
          f"max |parameter difference| {param_difference:.3g}; losses {one}")
    assert json.loads((tmp / "four" / "run" / "result.json").read_text())["hardware"]["mesh"].startswith("{data: 4, model: 1}")


def test_cli_mesh_run_resumes_on_one_device(four_devices, capsys):
    tmp, report = four_devices
    assert report["cli_status"] == [0, 0]
    run = tmp / "cli" / "run"
    assert len(_losses(run)) == 3
    # The checkpoint the data=4 run wrote at step 3 (itself resumed on the mesh from step 2) resumes here, on one
    # device, onto the one-device trajectory.
    assert main(["train", "--recipe", str(tmp / "cli" / "recipe.json"), "--out", str(run), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == STEPS
    np.testing.assert_allclose(_losses(run), _losses(tmp / "one" / "run"), rtol=0, atol=LOSS_TOLERANCE)


def test_bad_meshes_are_refused_naming_the_numbers(four_devices, tmp_path, capsys):
    _, report = four_devices
    batch_error, model_error = report["errors"]
    assert "data axis of 4 devices does not divide the batch size 6" in batch_error
    assert "data=N,model=1 only" in model_error and "model: 2" in model_error
    assert report["refused_wrote_nothing"]
    assert report["cli_bad_status"] == 2 and report["cli_bad_error"].count("\n") == 1
    assert "does not divide the batch size 6" in report["cli_bad_error"]
    # Here, on one device: a mesh of more devices than there are, and a mesh that is not one, refused before training.
    recipe = str(ROOT / "configs" / "train" / "demo-code.json")
    for text, message in (("data=4", "does not divide the 1 devices"), ("data4", "expected the form data=N")):
        assert main(["train", "--recipe", recipe, "--out", str(tmp_path / "run"), "--mesh", text]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ArgumentError, match="expected a jax.sharding.Mesh"):
        training_mesh(object(), 4)
    assert training_mesh(make_mesh(data=1), 3).shape == {"data": 1, "model": 1}
