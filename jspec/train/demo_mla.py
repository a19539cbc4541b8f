"""The MLA demo model `demo-code-mla`: export of its finished training run and its model-card section.

    jspec train --recipe demo-code-mla --out runs/demo-code-mla --tokenizer jspec/assets/demo-code/tokenizer.json
    python -m jspec.train.demo_mla --run runs/demo-code-mla --into-package     # bf16 export + card section
    python benchmarks/bench_tpla.py --write                                     # TPLA figures for the card

The model is `demo-code`'s recipe (corpus, tokenizer, width, depth, optimiser) with multi-head latent attention in
place of grouped-query attention, trained for a shorter budget. It is shipped in bfloat16 as a DeepseekV3 Hugging
Face directory (dense MLP in every layer); load with `jspec.load(path, dtype="float32")` for float32 decoding.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax

NAME = "demo-code-mla"
DTYPE = "bfloat16"
MEASUREMENTS = "tpla_measurements.md"  # written by benchmarks/bench_tpla.py --write, included in the card


def finish_stopped_run(run_dir: str | Path) -> None:
    """For a run stopped before its last step (the session's wall-clock cap): the model at its latest checkpoint saved
    to <run_dir>/model and a result.json like a finished run's, evaluated on the whole held-out split, with
    `stopped_at_step` and `scheduled_steps` saying where it stopped (the learning rate was not annealed). Resumes
    through `train(..., resume=True, stop_at_step=latest)`, so nothing is trained and the recipe is checked."""
    from jspec.checkpoint import orbax_store
    from jspec.train.trainer import CheckpointStore, TrainConfig, Trainer, prepare_data, train

    run_dir = Path(run_dir)
    config = TrainConfig.from_dict({**json.loads((run_dir / "recipe.json").read_text()), "out_dir": str(run_dir)})
    store = CheckpointStore(run_dir / "checkpoints", config.keep_checkpoints)
    latest = store.latest_step()
    store.close()
    data = prepare_data(config, log=lambda *_: None)
    result = train(config, resume=True, stop_at_step=latest, data=data)
    final = Trainer(config, data).evaluate(result.model.params, config.final_eval_windows)
    orbax_store.save(result.model, run_dir / "model", overwrite=True)
    summary = {"name": config.name, "steps": result.steps, "stopped_at_step": result.steps, "scheduled_steps": config.steps,
               "tokens_seen": result.tokens_seen, "wall_seconds": result.wall_seconds,
               "train_loss_last50": result.train_loss, "num_parameters": result.model.config.num_parameters(),
               "train_tokens": int(len(data.train_stream)), "heldout_tokens": int(len(data.heldout_stream)), **final,
               "eval_slice": f"held-out split, windows of {config.seq_len + 1} tokens at stride {config.seq_len}; "
                             f"first {final.get('eval_windows')} windows; mean next-token cross-entropy (nats)"}
    (run_dir / "result.json").write_text(json.dumps(summary, indent=2) + "\n")


def export_mla(run_dir: str | Path, assets: str | Path) -> Path:
    """Export the finished run in `run_dir` (its orbax `model`, recipe.json, result.json) to <assets>/demo-code-mla in
    bfloat16, verified by reading it back (`demo.export_model`), keeping a measurements file already there."""
    from jspec.checkpoint import orbax_store
    from jspec.train.demo import export_model

    run_dir, destination = Path(run_dir), Path(assets) / NAME
    model = orbax_store.restore(run_dir / "model")
    model = model.replace(params=jax.tree.map(lambda x: x.astype(DTYPE), model.params),
                          config=model.config.replace(dtype=DTYPE))
    files = {"training_recipe.json": (run_dir / "recipe.json").read_text(),
             "training_result.json": (run_dir / "result.json").read_text()}
    if (destination / MEASUREMENTS).is_file():
        files[MEASUREMENTS] = (destination / MEASUREMENTS).read_text()
    export_model(model, destination, files, check_config=True)
    return destination


def mla_card_section(assets: Path) -> list[str]:
    """The card's section on demo-code-mla (empty when it is not shipped)."""
    directory = Path(assets) / NAME
    if not (directory / "config.json").is_file():
        return []
    result = json.loads((directory / "training_result.json").read_text())
    recipe = json.loads((directory / "training_recipe.json").read_text())
    mla = recipe["model"]["mla"]
    lines = [
        f"## MLA demo model: `{NAME}`",
        "",
        "`demo-code`'s recipe (same corpus, tokenizer, width and depth, optimiser) with DeepSeek-style multi-head latent",
        f"attention instead of grouped-query attention: kv_lora_rank {mla['kv_lora_rank']}, RoPE key {mla['qk_rope_head_dim']},",
        f"nope head dim {mla['qk_nope_head_dim']}, value head dim {mla['v_head_dim']}, {recipe['model']['num_heads']} heads, no query",
        f"low-rank; the cache holds {mla['kv_lora_rank'] + mla['qk_rope_head_dim']} values per token and layer (demo-code: 256).",
        f"Trained for {result['steps']} steps ({result['tokens_seen']:,} tokens, {result['wall_seconds'] / 60:.0f} minutes on 2",
        "shared CPU cores; demo-code had 2400 steps)" + (
            f", stopped at step {result['stopped_at_step']} of a {result['scheduled_steps']}-step schedule by a wall-clock "
            "cap (learning rate not annealed)" if "stopped_at_step" in result else "") + ": a budget cut to fit the",
        "session, so it is a weaker model than demo-code, meant for exercising MLA and TPLA, not for comparing attention kinds.",
        "Shipped in bfloat16 as a `DeepseekV3ForCausalLM` directory; `jspec.load(path, dtype=\"float32\")` decodes in float32.",
        "",
        f"| parameters | held-out loss (nats) | held-out perplexity |",
        "|---|---|---|",
        f"| {result['num_parameters']:,} | {result['eval_loss']:.4f} | {result['eval_perplexity']:.1f} |",
        "",
    ]
    measurements = directory / MEASUREMENTS
    if measurements.is_file():
        lines += ["### TPLA on demo-code-mla (benchmarks/bench_tpla.py)", "", measurements.read_text().strip(), ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo-code-mla", help="the finished training run directory")
    parser.add_argument("--assets", help="assets directory (default: the package's jspec/assets with --into-package)")
    parser.add_argument("--into-package", action="store_true")
    parser.add_argument("--finish-stopped", action="store_true",
                        help="the run was stopped before its last step: finish it at its latest checkpoint first")
    args = parser.parse_args()
    from jspec.train.demo import resolve_assets

    if args.finish_stopped:
        finish_stopped_run(args.run)
    assets = resolve_assets(Path(args.run).parent, args.assets, args.into_package)
    print(export_mla(args.run, assets))


if __name__ == "__main__":
    main()
