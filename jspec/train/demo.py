"""Build the demo models: train `demo-code` and `demo-code-draft` from their recipes, export them as Hugging Face
directories into an assets directory, measure them, and write its MODEL_CARD.md.

    jspec build-demo --out-root runs            # trains (CPU: about an hour), exports to runs/assets, writes the card
    jspec build-demo --out-root runs --into-package --overwrite   # replace the models shipped in jspec/assets
    python -m jspec.train.demo --export-only --out-root runs   # re-export finished runs (same flags)

Where it writes: `assets_dir` if given, else `<out_root>/assets`; the package's own jspec/assets only when asked
(`into_package=True`, `--into-package`). An assets directory that is not empty is refused before any training
unless `overwrite=True` (`--overwrite`); then each entry it writes (`<name>/`, MODEL_CARD.md) is replaced atomically
and every other entry is left alone.

What is measured (on the shipped float32 weights, read back through `load_hf`):
- held-out loss and perplexity: mean next-token cross-entropy over the evaluation slice (the held-out files,
  tokenized in manifest order with EOS after each file, cut into windows of 257 tokens at stride 256; all
  windows), computed in float32;
- the draft's top-1 agreement with the target: the fraction of positions in the same slice where both models'
  argmax next tokens are equal.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import jax
import jax.numpy as jnp

from jspec.checkpoint.directories import check_destination, write_directory, write_text_atomically
from jspec.models.model import Model
from jspec.train import corpus as corpus_lib
from jspec.train import data as data_lib
from jspec.train.objectives import token_cross_entropy

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
TARGET, DRAFT = "demo-code", "demo-code-draft"
NAMES = (DRAFT, TARGET)  # the draft first: it finishes sooner
DRAFT_DISTILL = "demo-code-draft-distill"  # the recipe that distills the plain-LM draft from the target (trained after both)
INIT_FILES = {"recipe": "init_training_recipe.json", "result": "init_training_result.json"}  # a distilled draft's first stage
DLLM, BLOCK_DIFFUSION = "demo-code-dllm", "demo-code-bd"  # diffusion LMs adapted from the target
DIFFUSION_NAMES = (DLLM, BLOCK_DIFFUSION)
DIGITS = "demo-digits"  # the class-conditional 8x8 digits model (jspec.train.digits, jspec.images)
BUILDABLE = NAMES + (DIGITS,)  # what `build(only=...)` / `jspec build-demo --only` may name
DIFFUSION_DTYPE = "bfloat16"  # they were trained in bf16; shipped in bf16 to halve their size
MAX_SHIPPED_BYTES = 80 * 1024 * 1024  # 64 MiB until demo-code-mla (13.7 MB, bf16) joined the package
SAMPLE_PROMPT = "import os\nimport sys\n\n\ndef main("


def resolve_assets(out_root: str | Path, assets_dir: str | Path | None = None, into_package: bool = False) -> Path:
    """Where an export writes: `assets_dir`, else the package's jspec/assets when `into_package`, else
    `<out_root>/assets` (never the installed package by default)."""
    if assets_dir is not None and into_package:
        raise ValueError(f"assets_dir: {str(assets_dir)!r} given together with into_package (--into-package); choose one")
    if assets_dir is not None:
        return Path(assets_dir).absolute()
    return ASSETS_DIR if into_package else Path(out_root).absolute() / "assets"


def check_assets(assets: Path, overwrite: bool) -> Path:
    """`assets` if an export may write there: missing, empty, or `overwrite`; else ValueError naming assets_dir
    (the directory is left untouched). A file at `assets` is refused."""
    check_destination(assets, overwrite=overwrite, argument="assets_dir (--assets)")
    return assets


def build(
    out_root: str | Path = "runs",
    assets_dir: str | Path | None = None,
    only: Sequence[str] | None = None,
    resume: bool = False,
    *,
    into_package: bool = False,
    overwrite: bool = False,
) -> None:
    """Train the recipes that have no finished run under out_root, then export and describe them (see the module
    docstring for where, and when an existing assets directory is refused: checked before any training).
    `only` may name demo-digits too (`BUILDABLE`); the default builds the code models."""
    from jspec.train import TrainConfig, train

    unknown = sorted(set(only or ()) - set(BUILDABLE))
    if unknown:
        raise ValueError(f"only: unknown demo model(s) {unknown}; buildable: {list(BUILDABLE)}")
    assets = check_assets(resolve_assets(out_root, assets_dir, into_package), overwrite)
    out_root = Path(out_root)
    for name in only or NAMES:
        run_dir = out_root / name
        if (run_dir / "result.json").is_file() and (run_dir / "model").is_dir():
            print(f"{name}: finished run found in {run_dir}, not retraining")
            continue
        train(TrainConfig.from_recipe(name, out_dir=str(run_dir)), resume=resume)
    distill_dir = out_root / DRAFT_DISTILL
    if set(only or NAMES) >= set(NAMES) and not (distill_dir / "result.json").is_file():
        recipe = TrainConfig.from_recipe(DRAFT_DISTILL, out_dir=str(distill_dir), init_from=str(out_root / DRAFT / "model"))
        recipe.objective_options = {**recipe.objective_options, "teacher": str(out_root / TARGET / "model")}
        train(recipe, resume=resume)
    if all((out_root / name / "result.json").is_file() for name in NAMES):
        export(out_root, assets, overwrite=overwrite)
        print(f"exported {', '.join(NAMES)} to {assets} (load them by path, e.g. jspec.load({str(assets / TARGET)!r}))")
    if DIGITS in (only or ()):  # the assets directory was checked above, before any training: it may be written
        export_digits(out_root, assets, overwrite=True)
        print(f"exported {DIGITS} to {assets} (load it by path: jspec.load({str(assets / DIGITS)!r}))")


def run_dirs(out_root: Path) -> dict[str, Path]:
    """The run each shipped code model comes from: the draft's distillation run (DRAFT_DISTILL) when it finished,
    else the draft's plain-LM run; the target's run."""
    dirs = {name: out_root / name for name in NAMES}
    if (out_root / DRAFT_DISTILL / "result.json").is_file():
        dirs[DRAFT] = out_root / DRAFT_DISTILL
    return dirs


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def heldout_windows(manifest: dict[str, Any], tokenizer, seq_len: int) -> np.ndarray:
    stream = data_lib.tokenize_documents(tokenizer, corpus_lib.load_documents(manifest, "heldout"))
    return data_lib.eval_windows(stream, seq_len)


def _forward_fn(model: Model):
    config = model.config

    @jax.jit
    def run(params, tokens):  # tokens [B, L + 1]
        from jspec.models import transformer

        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32)[None], inputs.shape)
        logits, _ = transformer.forward(params, config, inputs, positions)
        return jnp.sum(token_cross_entropy(logits, targets)), jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return run


def measure(target: Model, draft: Model, windows: np.ndarray, batch_size: int = 8) -> dict[str, Any]:
    """Held-out loss/perplexity of both models and the draft's top-1 agreement with the target."""
    run_target, run_draft = _forward_fn(target), _forward_fn(draft)
    sums = {TARGET: 0.0, DRAFT: 0.0}
    agree, count = 0, 0
    for start in range(0, len(windows), batch_size):
        chunk = jnp.asarray(windows[start : start + batch_size])
        target_sum, target_top = run_target(target.params, chunk)
        draft_sum, draft_top = run_draft(draft.params, chunk)
        sums[TARGET] += float(target_sum)
        sums[DRAFT] += float(draft_sum)
        agree += int(jnp.sum(target_top == draft_top))
        count += int(target_top.size)
    out: dict[str, Any] = {"eval_tokens": count, "eval_windows": int(len(windows)), "top1_agreement": agree / count}
    for name, total in sums.items():
        out[name] = {"eval_loss": total / count, "eval_perplexity": math.exp(total / count)}
    return out


def _sample(model: Model, prompt: str, max_new_tokens: int = 48) -> str | None:
    try:
        import jspec

        output = jspec.decode(model, [prompt], "greedy", max_new_tokens=max_new_tokens, key=0)
        return output.text[0] if output.text is not None else None
    except Exception as error:  # the card is still worth writing without a sample
        return f"(sample unavailable: {type(error).__name__}: {error})"


def export_model(model: Model, destination: Path, files: dict[str, str | bytes], *, check_config: bool = False) -> None:
    """Write `model` as a Hugging Face directory plus `files` (name -> text or bytes) onto `destination`, which is replaced
    atomically (`write_directory`) and only after the written directory read back through `load_hf` gives equal
    parameters (and, with check_config, an equal config but for its name); else ValueError, `destination` unchanged."""
    from jspec.checkpoint.hf import load_hf, save_hf

    def write(directory: Path) -> None:
        save_hf(model, directory)
        for file_name, content in files.items():
            path = directory / file_name
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        loaded = load_hf(directory)
        if check_config and loaded.config.replace(name=model.config.name) != model.config:
            raise ValueError(f"export: {destination.name}'s config does not read back equal through load_hf")
        for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(loaded.params)):
            if not np.array_equal(np.asarray(a), np.asarray(b)):
                raise ValueError(f"export: {destination.name} does not read back equal through load_hf")

    write_directory(destination, write, overwrite=True, argument="assets_dir (--assets)")


def export(
    out_root: str | Path = "runs", assets_dir: str | Path | None = None, *, into_package: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Export the finished runs' models to <assets>/<name>/ (Hugging Face format, float32 if everything fits
    in 40 MB, else bfloat16), verify the read-back, measure, and write MODEL_CARD.md. Returns the figures.
    Where, and when an existing assets directory is refused: see the module docstring."""
    from jspec.checkpoint import orbax_store
    from jspec.checkpoint.hf import load_hf

    assets = check_assets(resolve_assets(out_root, assets_dir, into_package), overwrite)
    out_root = Path(out_root)
    assets.mkdir(parents=True, exist_ok=True)
    runs = run_dirs(out_root)
    results = {name: json.loads((runs[name] / "result.json").read_text()) for name in NAMES}
    recipes = {name: json.loads((runs[name] / "recipe.json").read_text()) for name in NAMES}
    models = {name: orbax_store.restore(runs[name] / "model") for name in NAMES}
    if data_lib.tokenizer_digest(models[TARGET].tokenizer) != data_lib.tokenizer_digest(models[DRAFT].tokenizer):
        raise ValueError("export: demo-code and demo-code-draft were trained with different tokenizers")
    manifest = corpus_lib.build_manifest(heldout_fraction=recipes[TARGET]["heldout_fraction"])
    if manifest["digest"] != results[TARGET]["corpus"]["digest"]:
        raise ValueError("export: this machine's stdlib differs from the corpus the models were trained on")

    float32_bytes = sum(models[n].num_parameters() * 4 for n in NAMES)
    dtype = "float32" if float32_bytes < MAX_SHIPPED_BYTES - 4 * 1024 * 1024 else "bfloat16"
    shipped: dict[str, Model] = {}
    for name in NAMES:
        model = models[name]
        if dtype != "float32":
            model = model.replace(params=jax.tree.map(lambda x: x.astype(dtype), model.params), config=model.config.replace(dtype=dtype))
        files = {"training_recipe.json": json.dumps(recipes[name], indent=2) + "\n",
                 "training_result.json": json.dumps(results[name], indent=2) + "\n"}
        if name == TARGET:
            slim = {k: v for k, v in manifest.items() if k != "root"}
            slim["files"] = [{k: f[k] for k in ("path", "size", "sha256", "split")} for f in manifest["files"]]
            files["corpus_manifest.json"] = json.dumps(slim, separators=(",", ":")) + "\n"
        if runs[name] != out_root / name:  # a distilled draft: its first stage's recipe and result travel with it
            files[INIT_FILES["recipe"]] = (out_root / name / "recipe.json").read_text()
            files[INIT_FILES["result"]] = (out_root / name / "result.json").read_text()
        export_model(model, assets / name, files)
        shipped[name] = load_hf(assets / name)

    return measure_and_write_card(assets, shipped, results, recipes, manifest, dtype)


def measure_and_write_card(assets: Path, shipped: dict[str, Model], results, recipes, manifest, dtype: str) -> dict[str, Any]:
    """Measure the shipped models (held-out loss, agreement, samples) and write assets/MODEL_CARD.md."""
    windows = heldout_windows(manifest, shipped[TARGET].tokenizer, recipes[TARGET]["seq_len"])
    from jspec.train.trainer import DEFAULT_CACHE_DIR

    train_stream = data_lib.cached_token_stream(
        shipped[TARGET].tokenizer, corpus_lib.load_documents(manifest, "train"), DEFAULT_CACHE_DIR, f"{manifest['digest']}:train"
    )
    started = time.perf_counter()
    figures = measure(shipped[TARGET], shipped[DRAFT], windows)
    figures["measure_seconds"] = time.perf_counter() - started
    figures["train_tokens"] = int(len(train_stream))
    figures["shipped_dtype"] = dtype
    figures["sizes"] = {name: _dir_bytes(assets / name) for name in NAMES}
    figures["samples"] = {name: _sample(shipped[name], SAMPLE_PROMPT) for name in NAMES}
    initial = {name: {kind: json.loads((assets / name / file).read_text()) for kind, file in INIT_FILES.items()}
               for name in NAMES if (assets / name / INIT_FILES["result"]).is_file()}
    write_model_card(assets / "MODEL_CARD.md", shipped, results, recipes, manifest, figures, initial)
    shipped_dirs = [assets / n for n in NAMES + DIFFUSION_NAMES if (assets / n).is_dir()]
    total = sum(_dir_bytes(d) for d in shipped_dirs) + (assets / "MODEL_CARD.md").stat().st_size
    if total > MAX_SHIPPED_BYTES:
        raise ValueError(f"export: shipped files total {total:,} bytes, over the {MAX_SHIPPED_BYTES:,} limit")
    print(json.dumps({k: v for k, v in figures.items() if k != "samples"}, indent=2))
    return figures


def rewrite_card(assets_dir: str | Path) -> dict[str, Any]:
    """Re-measure the models already in assets_dir and rewrite its MODEL_CARD.md (no training run needed)."""
    from jspec.checkpoint.hf import load_hf

    assets = Path(assets_dir)
    results = {name: json.loads((assets / name / "training_result.json").read_text()) for name in NAMES}
    recipes = {name: json.loads((assets / name / "training_recipe.json").read_text()) for name in NAMES}
    shipped = {name: load_hf(assets / name) for name in NAMES}
    manifest = corpus_lib.build_manifest(heldout_fraction=recipes[TARGET]["heldout_fraction"])
    if manifest["digest"] != results[TARGET]["corpus"]["digest"]:
        raise ValueError("rewrite_card: this machine's stdlib differs from the corpus the models were trained on")
    return measure_and_write_card(assets, shipped, results, recipes, manifest, shipped[TARGET].config.dtype)


def export_diffusion(
    out_root: str | Path = "runs", assets_dir: str | Path | None = None, *, into_package: bool = False, overwrite: bool = False
) -> None:
    """Export the finished diffusion runs (demo-code-dllm, demo-code-bd) to the assets directory in bfloat16,
    verify the read-back, and rewrite MODEL_CARD.md (which then has their section). The directory already holds
    `demo-code` (they are adapted from it), so this needs `overwrite=True`; see the module docstring."""
    from jspec.checkpoint import orbax_store

    assets = check_assets(resolve_assets(out_root, assets_dir, into_package), overwrite)
    out_root = Path(out_root)
    for name in DIFFUSION_NAMES:
        result = json.loads((out_root / name / "result.json").read_text())
        recipe = json.loads((out_root / name / "recipe.json").read_text())
        model = orbax_store.restore(out_root / name / "model")
        model = model.replace(
            params=jax.tree.map(lambda x: x.astype(DIFFUSION_DTYPE), model.params), config=model.config.replace(dtype=DIFFUSION_DTYPE)
        )
        files = {"training_recipe.json": json.dumps(recipe, indent=2) + "\n", "training_result.json": json.dumps(result, indent=2) + "\n"}
        export_model(model, assets / name, files, check_config=True)
    rewrite_card(assets)


HELDOUT_CHECK_WINDOWS = 32  # the card's re-measurable held-out figure of a shipped diffusion demo (a test repeats it)


def shipped_heldout_loss(model: Model, recipe: dict[str, Any], windows: int = HELDOUT_CHECK_WINDOWS) -> float:
    """A shipped diffusion demo's held-out loss on its (bf16) weights over the first `windows` held-out windows, computed
    as its run's final evaluation computes it (`trainer.recipe_eval_loss`)."""
    from jspec.train.trainer import recipe_eval_loss

    manifest = json.loads((ASSETS_DIR / TARGET / "corpus_manifest.json").read_text())
    heldout = heldout_windows({**manifest, "root": str(corpus_lib.stdlib_root())}, model.tokenizer, recipe["seq_len"])
    return recipe_eval_loss(model, recipe, heldout[:windows])["eval_loss"]


# The card's decoding figures: held-out prompts (bench.heldout_prompts), batch 1, float32, greedy, no stop tokens, as
# benchmarks/bench_diffusion.py measures them; the first setting of each model is its one-token-per-forward reference.
DECODING_PROMPTS, DECODING_PROMPT_TOKENS, DECODING_NEW_TOKENS = 4, 64, 64
DECODING_SETTINGS = {
    DLLM: (("dllm_static", "dllm_static", {"block_size": 32}),
           ("dllm_threshold t=0.9", "dllm_threshold", {"block_size": 32, "threshold": 0.9}),
           ("dllm_threshold t=0.7", "dllm_threshold", {"block_size": 32, "threshold": 0.7})),
    BLOCK_DIFFUSION: (("block_diffusion t=1", "block_diffusion", {"threshold": 1.0}),
                      ("block_diffusion t=0.9", "block_diffusion", {"threshold": 0.9}),
                      ("block_diffusion t=0.9 sub_block cache", "block_diffusion", {"threshold": 0.9, "cache": "sub_block"})),
}


def decoding_figures(model: Model, name: str) -> dict[str, dict[str, float]]:
    """Tokens per forward and agreement with the reference (the first setting) of each of the card's decoding
    settings for `name` on the held-out prompts, one prompt per call. Deterministic (greedy)."""
    import jspec
    from jspec import bench

    prompts = bench.heldout_prompts(model.tokenizer, DECODING_PROMPTS, DECODING_PROMPT_TOKENS)
    figures, reference = {}, None
    for label, strategy, options in DECODING_SETTINGS[name]:
        calls, outputs = 0, []
        for prompt in prompts:
            out = jspec.decode(model, [prompt], strategy, max_new_tokens=DECODING_NEW_TOKENS, stop_tokens=[], key=0, **options)
            calls += int(out.stats["model_calls"])
            outputs += out.sequences()
        reference = outputs if reference is None else reference
        same = sum(a == b for row, ref in zip(outputs, reference) for a, b in zip(row, ref))
        total = sum(len(row) for row in outputs)
        figures[label] = {"tokens_per_forward": total / calls, "agreement": same / sum(len(ref) for ref in reference)}
    return figures


DIFFUSION_SAMPLE = {DLLM: ("freedave", {"block_size": 32, "draft_steps": 4}), BLOCK_DIFFUSION: ("block_diffusion", {"threshold": 0.9})}


def diffusion_card_section(assets: Path) -> list[str]:
    """The card's section on the shipped diffusion models (empty when none is shipped)."""
    import jspec
    from jspec.checkpoint.hf import load_hf

    shipped = [name for name in DIFFUSION_NAMES if (assets / name / "config.json").is_file()]
    if not shipped:
        return []
    lines = [
        "## Diffusion demo models: `demo-code-dllm` and `demo-code-bd`",
        "",
        "Both are adapted from `demo-code` (its weights, tokenizer and architecture; one token `<|mask|>` added to the",
        "tokenizer and the embedding, initialised at the mean embedding), as Dream and Fast-dLLM v2 adapt autoregressive",
        "models, and trained on the same corpus (stage 1); a recipe with `distill` then fine-tunes stage 1 on distilled",
        "targets (stage 2, `jspec/train/distilled.py`): `demo-code`'s own greedy continuations of prefixes cut from the",
        "training split, far less ambiguous than raw code, so the model grows confident enough for confidence-threshold",
        "decoding to unmask several tokens per forward. Shipped in bfloat16 (they were trained in bf16 compute); load",
        "with `jspec.load(name, dtype=\"float32\")` to decode in float32.",
        "",
        "| | " + " | ".join(f"`{n}`" for n in shipped) + " |",
        "|---|" + "---|" * len(shipped),
    ]
    info = {n: (json.loads((assets / n / "training_result.json").read_text()), json.loads((assets / n / "training_recipe.json").read_text()), load_hf(assets / n)) for n in shipped}
    rows = [
        ("Kind", lambda r, c, m: {"masked": "masked diffusion (LLaDA / Dream): bidirectional", "block": f"block diffusion (Fast-dLLM v2): causal across {m.config.diffusion_block_size}-token blocks, bidirectional inside"}[m.config.diffusion]),
        ("Logits", lambda r, c, m: "shifted (position i predicted at i-1)" if m.config.shifted_logits else "unshifted"),
        ("Mask token id (vocab)", lambda r, c, m: f"{m.config.mask_token_id} ({m.config.vocab_size})"),
        ("Objective", lambda r, c, m: f"`{c['objective']}`" + (" (complementary masks, token shift)" if c["objective"] == "block_diffusion" else " (1/t-weighted)")),
        ("Training data", lambda r, c, m: _training_data(r, c)),
        ("Steps x tokens/step", lambda r, c, m: f"{c['steps']} x {c['batch_size']}x{c['seq_len']} from "
         + ("stage 1" if c.get("distill") else f"`{c['init_from']}`")),
        ("Peak LR / warmup", lambda r, c, m: f"{c['learning_rate']:g} / {c['warmup_steps']}, cosine to {c['min_learning_rate_ratio']:g}x"),
        ("Training wall time", lambda r, c, m: _minutes(r["wall_seconds"])),
        ("Held-out loss (nats/token)", lambda r, c, m: f"{r['eval_loss']:.3f}"),
        (f"Held-out loss, shipped weights, first {HELDOUT_CHECK_WINDOWS} windows", lambda r, c, m: f"{shipped_heldout_loss(m, c):.4f}"),
    ]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(*info[n]) for n in shipped) + " |")
    lines += [
        "",
        "Held-out figures are over the same held-out windows as above, in the recipe's compute dtype: for `demo-code-dllm`",
        "the masked-diffusion negative ELBO (an upper bound on its negative log-likelihood, comparable with the",
        "target's 3.30 nats/token); for `demo-code-bd` the mean cross-entropy of each token predicted where it is",
        "masked (a block-diffusion training loss, not a likelihood bound). Both are Monte-Carlo estimates with a",
        "fixed key.",
        "",
        "Rebuild (after `demo-code` exists in the assets):",
        "",
        "```bash",
        *(_rebuild_commands(info[n][1], n) for n in shipped),
        "python -m jspec.train.demo --out-root runs --export-diffusion --into-package --overwrite   # bf16, rewrites this card",
        "```",
        "",
        f"Decoding on {DECODING_PROMPTS} held-out prompts ({DECODING_PROMPT_TOKENS} tokens each, the first of held-out files;",
        f"{DECODING_NEW_TOKENS} new tokens, batch 1, float32, greedy; agreement: position by position with the first row;",
        "`jspec.train.demo.decoding_figures`, re-measured by tests/test_diffusion_demo.py):",
        "",
        "| Model | Decoding | Tokens per forward | Agreement |",
        "|---|---|---|---|",
    ]
    for name in shipped:
        model = load_hf(assets / name, dtype="float32")
        for label, figure in decoding_figures(model, name).items():
            lines.append(f"| `{name}` | {label} | {figure['tokens_per_forward']:.2f} | {100 * figure['agreement']:.1f}% |")
    lines += [
        "",
        "Samples (greedy, 64 new tokens, prompt as above):",
        "",
    ]
    for name in shipped:
        strategy, options = DIFFUSION_SAMPLE[name]
        model = load_hf(assets / name, dtype="float32")
        out = jspec.decode(model, [SAMPLE_PROMPT], strategy, max_new_tokens=64, key=0, **options)
        lines += [f"`{name}` (`{strategy}`, {int(out.stats['model_calls'])} forwards):", "", "```python", SAMPLE_PROMPT + out.text[0], "```", ""]
    return lines


def _training_data(result: dict[str, Any], recipe: dict[str, Any]) -> str:
    """The card's description of what a diffusion demo trained on: the packed corpus, or distilled examples."""
    spec = result.get("corpus", {}).get("distilled")
    if not recipe.get("distill") or not spec:
        return "the training split, packed"
    continuation = recipe["seq_len"] - spec["prefix_tokens"]
    decoding = "greedy" if spec["temperature"] == 0 else f"sampled at temperature {spec['temperature']:g}"
    return (f"distilled: {spec['examples']} examples of {spec['prefix_tokens']} training-split tokens + `{spec['teacher']}`'s "
            f"{decoding} continuation ({continuation} tokens; {spec['teacher_tokens']:,} teacher tokens)")


def _rebuild_commands(recipe: dict[str, Any], name: str) -> str:
    """The `jspec train` line(s) that rebuild a shipped diffusion demo: stage 1 on the corpus, then (when it was
    distilled) stage 2 from stage 1's output on the distilled examples."""
    if not recipe.get("distill"):
        return f"jspec train --recipe {name} --out runs/{name}"
    return f"jspec train --recipe {name} --out runs/{name}-stage1\njspec train --recipe {name}-distilled --out runs/{name}"


def _architecture(model: Model) -> str:
    c = model.config
    return (
        f"Llama-style decoder: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} query heads / "
        f"{c.num_kv_heads} KV heads ({'GQA' if c.num_kv_heads < c.num_heads else 'MHA'}), head dim {c.head_size}, SwiGLU MLP {c.intermediate_size}, RMSNorm, "
        f"RoPE theta {c.rope_theta:g}, {'tied' if c.tie_embeddings else 'untied'} embeddings, vocab {c.vocab_size}, "
        f"max positions {c.max_position_embeddings}"
    )


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _staged(initial: dict[str, Any], name: str, kind: str, cell, joiner: str = " + ") -> str:
    """A card cell over a model's training stages: its first stage's value (when it was trained in two) then its own."""
    values = [initial[name][kind]] if name in initial else []
    return joiner.join(cell(value) for value in values + [None])


def draft_objective_lines(recipe: dict[str, Any], initial: dict[str, Any]) -> list[str]:
    """The card's sentence on how the draft was trained: the same way as the target, or then distilled from it."""
    if recipe["objective"] != "distill":
        return ["  on the same data (not distilled)."]
    options = recipe["objective_options"]
    first = initial.get("result", {})
    return [
        f"  on the same data ({first.get('steps', '?')} steps), then distilled from the target for {recipe['steps']} more steps",
        f"  (objective `distill`, recipe configs/train/{DRAFT_DISTILL}.json): per position {options.get('kl_weight', 1.0):g} x",
        f"  T^2 KL(target || draft) at temperature T = {options.get('temperature', 1.0):g}, plus "
        f"{options.get('teacher_argmax_weight', 0.0):g} x cross-entropy on the target's",
        f"  argmax token and {options.get('hard_label_weight', 0.0):g} x cross-entropy on the data's token; the target frozen, "
        "its logits computed in the",
        f"  training step; peak LR {recipe['learning_rate']:g}, warmup {recipe['warmup_steps']}, cosine to "
        f"{recipe['min_learning_rate_ratio']:g}x. Train losses in the table are the last stage's objective.",
    ]


def write_model_card(path: Path, models: dict[str, Model], results, recipes, manifest, figures, initial=None) -> None:
    """initial: for a model trained in two stages (the distilled draft), {name: {"recipe": ..., "result": ...}} of
    its first stage; `results` and `recipes` hold the last stage."""
    initial = initial or {}
    target_cfg = models[TARGET].config
    lines = [
        "# jspec demo models: `demo-code`, `demo-code-draft` (and the diffusion LMs at the end)",
        "",
        "Two small code models shipped inside the package so that `jspec.load(\"demo-code\")` and",
        "`jspec.load(\"demo-code-draft\")` work offline. They exist to demonstrate decoding strategies (the draft",
        "is a speculative-decoding draft for the target), not to write useful code: they are tiny, trained for",
        "at most two epochs of a small corpus on a shared 2-core CPU, and complete Python in the style of the",
        "standard library (greedy decoding soon repeats itself).",
        "",
        "Both are Hugging Face directories (LlamaForCausalLM config, model.safetensors, tokenizer.json) and load",
        "in `transformers` as well as in jspec.",
        "",
        "| | demo-code (target) | demo-code-draft |",
        "|---|---|---|",
    ]
    rows = [
        ("Parameters", lambda n: f"{models[n].num_parameters():,}"),
        ("Layers / hidden / heads (KV)", lambda n: f"{models[n].config.num_layers} / {models[n].config.hidden_size} / {models[n].config.num_heads} ({models[n].config.num_kv_heads})"),
        ("MLP size", lambda n: str(models[n].config.intermediate_size)),
        ("Shipped dtype / size", lambda n: f"{figures['shipped_dtype']} / {figures['sizes'][n] / 1e6:.1f} MB"),
        ("Training steps x tokens/step", lambda n: _staged(initial, n, "result", lambda r: str((r or results[n])["steps"]))
         + f" x {recipes[n]['batch_size']}x{recipes[n]['seq_len']}"),
        ("Tokens seen", lambda n: _staged(initial, n, "result", lambda r: f"{(r or results[n])['tokens_seen']:,}") + " ("
         + _staged(initial, n, "result", lambda r: f"{(r or results[n])['tokens_seen'] / figures['train_tokens']:.2f}") + " epochs)"),
        ("Training wall time", lambda n: _staged(initial, n, "result", lambda r: _minutes((r or results[n])["wall_seconds"]))),
        ("Compute dtype (master weights fp32)", lambda n: recipes[n]["compute_dtype"]),
        ("Peak LR / warmup / schedule", lambda n: _staged(initial, n, "recipe", lambda r: (
            f"{(r or recipes[n])['learning_rate']:g} / {(r or recipes[n])['warmup_steps']} / cosine to "
            f"{(r or recipes[n])['min_learning_rate_ratio']:g}x"), joiner=", then ")),
        ("Final train loss (mean of last 50 steps)", lambda n: f"{results[n]['train_loss_last50']:.3f}"),
        ("Held-out loss (nats/token, fp32)", lambda n: f"{figures[n]['eval_loss']:.3f}"),
        ("Held-out perplexity", lambda n: f"{figures[n]['eval_perplexity']:.2f}"),
    ]
    for label, cell in rows:
        lines.append(f"| {label} | {cell(TARGET)} | {cell(DRAFT)} |")
    lines += [
        "",
        f"**Draft top-1 agreement with the target** on the held-out slice: **{figures['top1_agreement']:.1%}** of "
        f"{figures['eval_tokens']:,} positions (both models' argmax next token equal).",
        "",
        "## Architecture",
        "",
        f"- `demo-code`: {_architecture(models[TARGET])}.",
        f"- `demo-code-draft`: {_architecture(models[DRAFT])}.",
        "",
        "## Training",
        "",
        f"- Hardware: {results[TARGET]['hardware']['cpu_count']} CPU cores ({results[TARGET]['hardware']['backend']}), "
        f"shared with other jobs while training (so wall times are longer than the same recipe takes alone); "
        f"jax {results[TARGET]['hardware']['jax']}, Python {results[TARGET]['hardware']['python']}.",
        "- Objective: next-token cross-entropy on packed windows of 256 tokens (documents joined with `<|endoftext|>`,",
        "  attention crossing document boundaries, as in GPT-2 packing); AdamW (b1 0.9, b2 0.95, weight decay 0.1 on",
        "  matrices), global-norm clipping at 1.0, linear warmup then cosine decay. The draft is trained the same way",
        *draft_objective_lines(recipes[DRAFT], initial.get(DRAFT, {})),
        "- Recipe choice: a first target of 6 layers x 256 (5.8M parameters, 700 steps) learned more slowly per token",
        "  than the 2-layer draft (held-out loss 4.31 against the draft's 3.70). In 150-step probes on the same schedule",
        "  (mean train loss over steps 141-150) 3 layers x 384 reached 5.16, 6 x 256 reached 5.48 at peak LR 2e-3, 5.35",
        "  at 1e-3 and 5.63 at 3e-3; so the target is shallow and wide, and trained for more steps than the draft.",
        "- Wall time is summed over resumed segments (a segment's steps after its last checkpoint, redone after an",
        "  interruption, are not counted twice). Alone on 2 cores the target trains at about 2,200 tokens/s (about",
        "  37 minutes for its recipe) and the draft at about 4,000 tokens/s.",
        "- Deterministic: the same recipe on the same machine reproduces the same weights; a resumed run continues",
        "  exactly. Rebuild:",
        "",
        "```",
        "jspec train --recipe demo-code-draft --out runs/demo-code-draft",
        "jspec train --recipe demo-code --out runs/demo-code",
        "jspec build-demo --out-root runs --into-package --overwrite   # distills the draft from the target",
        f"    # (configs/train/{DRAFT_DISTILL}.json, into runs/{DRAFT_DISTILL}), exports both to jspec/assets/, rewrites this card",
        "```",
        "",
        "## Evaluation slice",
        "",
        f"The held-out split is by file: a file is held out when sha256(\"{manifest['split_salt']}:<relative path>\") "
        f"read as a fraction is below {manifest['heldout_fraction']} ({manifest['num_heldout_files']} of "
        f"{manifest['num_files']} files). The held-out files are tokenized in sorted path order with "
        f"`<|endoftext|>` after each, the stream is cut into windows of 257 tokens at stride 256, and all "
        f"{figures['eval_windows']} windows are scored: loss is the mean next-token cross-entropy (nats) over their "
        f"{figures['eval_tokens']:,} targets, computed in float32 on the shipped weights; perplexity is exp(loss). "
        f"The training-time figure (in training_result.json, computed in the recipe's compute dtype) is "
        f"{results[TARGET]['eval_loss']:.3f} for the target and "
        + (f"{results[DRAFT]['eval_loss']:.3f} for the draft." if DRAFT not in initial else
           f"{initial[DRAFT]['result']['eval_loss']:.3f} for the draft's first stage (its last stage reports its "
           f"{recipes[DRAFT]['objective']!r} objective instead: {results[DRAFT]['eval_loss']:.3f})."),
        "",
        "## Tokenizer",
        "",
        f"Byte-level BPE (Hugging Face `tokenizers`: ByteLevel pre-tokenizer and decoder, no normalizer), "
        f"{target_cfg.vocab_size} tokens including the one special token `<|endoftext|>` (id "
        f"{target_cfg.eos_token_ids[0]}, the EOS), trained on the training split only. Lossless: decoding the "
        "encoding of any text gives the text back (non-ASCII included). Shared by both models (identical "
        "tokenizer.json). Like GPT-2's, the literal text `<|endoftext|>` in an input encodes as the EOS token.",
        "",
        "## Corpus",
        "",
        f"The `*.py` sources of the Python {manifest['python_version']} standard library on the training machine "
        f"(`sysconfig.get_paths()[\"stdlib\"]`), excluding test directories ({', '.join(manifest['excluded_dirs'])}), "
        f"files over {manifest['max_file_bytes']:,} bytes (generated data) and non-UTF-8 files: "
        f"{manifest['num_files']} files, {manifest['num_bytes']:,} bytes; {manifest['num_files'] - manifest['num_heldout_files']} "
        f"for training, {manifest['num_heldout_files']} held out. The sorted file list with sizes and sha256 is in "
        f"`demo-code/corpus_manifest.json` (digest `{manifest['digest'][:16]}`); training on another Python version "
        "builds a different corpus (the recipe records which one it saw).",
        "",
        "## Samples (greedy decoding, 48 new tokens at most; the prompt is everything up to `def main(`)",
        "",
        "Prompts that end in spaces (`\"    \"`) cut a whitespace token in two and read as odd indentation to a BPE",
        "model; end prompts at a newline or inside a statement.",
        "",
    ]
    for name in (TARGET, DRAFT):
        lines += [f"`{name}`:", "", "```python", SAMPLE_PROMPT + (figures["samples"][name] or ""), "```", ""]
    lines += other_models_card_sections(path.parent)
    write_text_atomically(path, "\n".join(lines))


CARD_NOTES = "card_notes.md"  # hand-written card text beside a model's weights (an export that replaces the
# model directory drops it with the weights it describes; see other_models_card_sections)


def card_notes(assets: Path, name: str) -> list[str]:
    """The hand-written lines of <assets>/<name>/CARD_NOTES (none when absent), then a blank line."""
    path = Path(assets) / name / CARD_NOTES
    return path.read_text().rstrip("\n").splitlines() + [""] if path.is_file() else []


def other_models_card_sections(assets: Path) -> list[str]:
    """The card's sections after demo-code's and demo-code-draft's, each from what its model directories hold: the
    diffusion demos (generated, then demo-code-dllm's CARD_NOTES), the Learn2PD filters, demo-code-recurrent (its
    CARD_NOTES: the section is written by hand), demo-code-mla, and the limitations. Hand-written text lives in
    CARD_NOTES files, so a rewrite of the card keeps it (tests/test_train.py compares the card with this)."""
    from jspec.train.demo_mla import mla_card_section
    from jspec.train.learn2pd import card_section as learn2pd_card_section

    lines = diffusion_card_section(assets) + card_notes(assets, "demo-code-dllm") + learn2pd_card_section(assets)
    lines += card_notes(assets, "demo-code-recurrent") + mla_card_section(assets)
    return lines + [
        "## Limitations",
        "",
        "Tiny models trained briefly: the code they write is plausible-looking stdlib-flavoured Python, often wrong.",
        "They have seen only the Python standard library, have no safety tuning, and should be used only to",
        "exercise and benchmark decoding algorithms.",
        "",
    ]


def export_digits(
    out_root: str | Path = "runs", assets_dir: str | Path | None = None, *, into_package: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Export the finished demo-digits run to <assets>/demo-digits/ (Hugging Face format, float32) with its model card
    (MODEL_CARD.md), a picture of samples (samples.png) and the training recipe and result; verify the read-back.
    The card's figures are measured on the exported weights (they read back bit for bit): held-out loss, and the
    rate at which a classifier of real digits labels 100 samples as the class asked for. Returns the figures.
    Where, and when an existing assets directory is refused: see the module docstring."""
    from jspec import images
    from jspec.checkpoint import orbax_store
    from jspec.train import digits

    assets = check_assets(resolve_assets(out_root, assets_dir, into_package), overwrite)
    run = Path(out_root) / DIGITS
    result = json.loads((run / "result.json").read_text())
    recipe = json.loads((run / "recipe.json").read_text())
    model = orbax_store.restore(run / "model")
    manifest = digits.build_manifest(recipe["heldout_fraction"])
    if manifest["digest"] != result["corpus"]["digest"]:
        raise ValueError("export: this machine's scikit-learn digits data differs from the data the model was trained on")
    started = time.perf_counter()
    figures = {**digits.heldout_loss(model, recipe["heldout_fraction"]),
               **digits.classifier_rate(model, recipe["heldout_fraction"], samples_per_class=10, key=0)}
    figures["measure_seconds"] = time.perf_counter() - started
    picture = images.png_bytes(images.image_grid(figures.pop("images"), columns=10))
    files = {
        "training_recipe.json": json.dumps(recipe, indent=2) + "\n",
        "training_result.json": json.dumps(result, indent=2) + "\n",
        "samples.png": picture,
        "MODEL_CARD.md": digits_card(model, result, recipe, figures),
    }
    assets.mkdir(parents=True, exist_ok=True)
    export_model(model, assets / DIGITS, files)
    print(json.dumps(figures, indent=2))
    return figures


def digits_card(model: Model, result: dict[str, Any], recipe: dict[str, Any], figures: dict[str, Any]) -> str:
    """demo-digits' MODEL_CARD.md."""
    from jspec import images

    c = model.config
    per_class = ", ".join(f"{digit}: {rate:.0%}" for digit, rate in enumerate(figures["per_class"]))
    hardware = result["hardware"]
    lines = [
        "# `demo-digits`: a class-conditional autoregressive model of 8x8 handwritten digits",
        "",
        "A tiny image-token model shipped inside the package so that `jspec.load(\"demo-digits\")` works offline. It",
        "draws a digit one pixel at a time: the prompt is a class token, the 64 generated tokens are the pixels of",
        "an 8x8 image in row-major order, each one of 17 grey levels. It exists to exercise decoding strategies on",
        "sampled (not greedy) image tokens, where sampled tokens rarely repeat (the setting of Speculative Jacobi",
        "Decoding), and its samples can be looked at: `jspec.images` turns them into a PNG.",
        "",
        "![100 samples: one row per digit 0-9, autoregressive sampling at temperature 1](samples.png)",
        "",
        "`samples.png`: 10 samples of each digit (rows 0-9), autoregressive sampling at temperature 1, key 0.",
        "",
        "| | |",
        "|---|---|",
        f"| Parameters | {model.num_parameters():,} |",
        f"| Layers / hidden / heads (KV) | {c.num_layers} / {c.hidden_size} / {c.num_heads} ({c.num_kv_heads}) |",
        f"| Vocabulary | {c.vocab_size}: pixels `0`-`16` (ids 0-16), classes `<digit_0>`-`<digit_9>` (ids 17-26), "
        f"EOS `{images.EOS_TOKEN}` (id {c.eos_token_ids[0]}), `{images.UNK_TOKEN}` |",
        f"| Training | {result['steps']} steps x {recipe['batch_size']} images "
        f"({result['steps'] * recipe['batch_size'] / (result['train_tokens'] / 66):.0f} epochs), peak LR "
        f"{recipe['learning_rate']:g} (warmup {recipe['warmup_steps']}, cosine to {recipe['min_learning_rate_ratio']:g}x), "
        f"{_minutes(result['wall_seconds'])} |",
        f"| Final train loss (mean of last 50 steps) | {result['train_loss_last50']:.3f} nats/token |",
        f"| Held-out loss (nats/token, fp32) | **{figures['eval_loss']:.3f}** over {figures['eval_images']} held-out images "
        f"(65 targets each: 64 pixels and EOS); {figures['nats_per_image']:.1f} nats per image |",
        f"| Samples labelled as asked | **{figures['rate']:.0%}** of 100 (10 per digit, temperature 1) |",
        "",
        "## Samples labelled as asked",
        "",
        "A logistic-regression classifier (scikit-learn, pixels / 16) trained on the real training images, which labels",
        f"{figures['classifier_heldout_accuracy']:.1%} of the held-out real images correctly, labels "
        f"**{figures['rate']:.0%}** of 100 samples as the digit the prompt asked for (per digit: {per_class}). The",
        "samples are those in samples.png: `jspec.images.generate_digits(model, range(10), \"sample\", num_samples=10,",
        "key=0)` (autoregressive sampling at temperature 1, no top-k or top-p). tests/test_digits.py checks the same",
        "property (at least 80%) with a classifier trained in the test on all real images.",
        "",
        "## Architecture",
        "",
        f"{_architecture(model)}. A training window is one image: [class token, 64 pixel tokens, EOS] (66 tokens), so",
        "attention never crosses images.",
        "",
        "## Data",
        "",
        f"scikit-learn's bundled digits (`sklearn.datasets.load_digits()`, the `digits.csv.gz` in the scikit-learn "
        f"{result['corpus']['sklearn_version']} wheel; no download): {result['corpus']['num_rows']} images of 8x8 pixels in 0-16",
        f"with labels 0-9 (the UCI optical recognition of handwritten digits test set, 4x4 blocks of 32x32 bitmaps). Held out",
        f"by row: row i is held out when sha256(\"jspec-heldout-v1:digits/<i>\") read as a fraction is below "
        f"{recipe['heldout_fraction']} ({result['corpus']['num_heldout_rows']} images); the rest train. Data sha256: "
        f"`{result['corpus']['digest'][:16]}`.",
        "",
        "## Training",
        "",
        "- Objective: next-token cross-entropy over the 64 pixels and EOS of each image (the class token is the prompt,",
        "  never a target); AdamW (b1 0.9, b2 0.95, weight decay 0.1 on matrices), global-norm clipping at 1.0, linear",
        "  warmup then cosine decay; float32.",
        f"- Hardware: {hardware['cpu_count']} CPU cores ({hardware['backend']}) shared with other jobs; jax {hardware['jax']}, "
        f"Python {hardware['python']}.",
        "- Recipe choice: with the same model and schedule over 1500 steps the held-out loss was lowest near step 1000",
        "  (1.138) and rose after (1.226 at 1500: the model memorises 1618 images), so the recipe ends sooner.",
        "- Deterministic: the same recipe on the same machine gives the same weights. Rebuild:",
        "",
        "```",
        "pip install 'jspec[images]'   # scikit-learn, which ships the data",
        "jspec train --recipe demo-digits --out runs/demo-digits",
        "jspec build-demo --out-root runs --only demo-digits --into-package --overwrite   # exports here, rewrites this card",
        "```",
        "",
        "## Use",
        "",
        "```python",
        "import jspec",
        "model = jspec.load(\"demo-digits\")",
        "pictures, output = jspec.images.generate_digits(model, [3, 7], \"sample\", num_samples=8, key=0)  # [16, 8, 8]",
        "jspec.images.write_png(\"digits.png\", jspec.images.image_grid(pictures, columns=8))",
        "```",
        "",
        "`jspec generate --model demo-digits --prompt-class 3 --num-samples 16 --strategy sample --png digits.png`",
        "",
        "## Limitations",
        "",
        "Trained on 1618 small images for a few minutes: some samples are smudged or ambiguous, and at low temperature",
        "or greedy decoding every sample of a class is the same picture. Only for exercising decoding algorithms.",
        "",
    ]
    return "\n".join(lines)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose where an export writes (shared by `jspec build-demo` and `python -m jspec.train.demo`)."""
    parser.add_argument("--out-root", default="runs", help="training run directories are <out-root>/<model name>")
    parser.add_argument("--assets", default=None, help="export into this directory (default: <out-root>/assets)")
    parser.add_argument(
        "--into-package", action="store_true", help="export into the installed package's jspec/assets (replaces the shipped demos)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty assets directory, replacing the entries the export writes"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jspec.train.demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_output_arguments(parser)
    parser.add_argument("--export-only", action="store_true", help="export finished runs without training")
    parser.add_argument("--card-only", action="store_true", help="re-measure the exported models and rewrite MODEL_CARD.md")
    parser.add_argument("--export-diffusion", action="store_true", help="export the diffusion runs (demo-code-dllm, demo-code-bd)")
    args = parser.parse_args(argv)
    where = dict(into_package=args.into_package, overwrite=args.overwrite)
    if args.export_diffusion:
        export_diffusion(args.out_root, args.assets, **where)
    elif args.card_only:
        rewrite_card(resolve_assets(args.out_root, args.assets, args.into_package))
    elif args.export_only:
        export(args.out_root, args.assets, **where)
    else:
        build(args.out_root, args.assets, **where)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
