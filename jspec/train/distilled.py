"""A distilled training stream: a teacher model's own continuations of training-corpus prefixes.

A recipe's `distill` field replaces the packed training text by examples of exactly `seq_len` tokens, each a
prefix of `prefix_tokens` tokens cut from the TRAINING stream at a seeded random offset followed by the teacher's
continuation of it (`seq_len - prefix_tokens` tokens, decoded by jspec's own compiled batched decoding: greedy at
temperature 0, else sampling at that temperature). The targets of such examples are far less ambiguous than raw
code (the teacher's low-temperature choices are a function of the prefix), which is what a diffusion model needs
to become confident enough for confidence-threshold decoding to unmask several tokens per forward.

    "distill": {"teacher": "demo-code", "temperature": 0.0, "prefix_tokens": 64, "num_sequences": 3200,
                "seed": 0, "batch_rows": 128}

Guarantees:
- Only the training split is read: `distilled_stream` takes the training token stream and nothing else (the
  held-out stream, which the trainer still evaluates on, is never an input).
- Deterministic: the prefixes are a function of (train stream, seed, counts); greedy continuations are a function
  of the prefixes and the teacher's weights; sampled ones also of the seed (one key per chunk of rows).
- Cached: the stream is saved as .npy in the run directory under a digest of everything it depends on, so a
  resumed run (or a rerun) reuses it instead of decoding again.
- Packed for the existing trainer: examples are laid end to end with one EOS after the last, so
  `data.PackedBatches` at its default stride (`seq_len`) yields exactly one example per window in the first
  `seq_len` tokens (the diffusion objectives read only those; a causal objective's last target is the next
  example's first token).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jspec.validation import check_float, check_int

_GENERATION_LOG_EVERY = 4  # chunks


@dataclasses.dataclass(frozen=True)
class DistillSpec:
    """What a recipe's `distill` field holds; see the module docstring."""

    teacher: str = "demo-code"  # a model jspec.load knows (autoregressive, same tokenizer as the trained model)
    temperature: float = 0.0  # 0: greedy continuations; > 0: sampled at this temperature
    prefix_tokens: int = 64  # tokens of training text that open each example
    num_sequences: int = 3200  # examples (each seq_len tokens)
    seed: int = 0  # prefix offsets (and sampling keys)
    batch_rows: int = 128  # rows decoded per compiled call

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DistillSpec":
        if not isinstance(values, dict):
            raise ValueError(f"distill: expected a dict of {[f.name for f in dataclasses.fields(cls)]}, got {values!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"distill: unknown field(s) {unknown}; known fields are {sorted(known)}")
        spec = cls(**values)
        check_int("distill.prefix_tokens", spec.prefix_tokens, minimum=1)
        check_int("distill.num_sequences", spec.num_sequences, minimum=1)
        check_int("distill.seed", spec.seed, minimum=0)
        check_int("distill.batch_rows", spec.batch_rows, minimum=1)
        check_float("distill.temperature", spec.temperature, lambda t: t >= 0, "a float >= 0 (0: greedy)")
        if not isinstance(spec.teacher, str) or not spec.teacher:
            raise ValueError(f"distill.teacher: expected a model name or path jspec.load knows, got {spec.teacher!r}")
        return spec

    def continuation_tokens(self, seq_len: int) -> int:
        if self.prefix_tokens >= seq_len:
            raise ValueError(f"distill.prefix_tokens: expected fewer than seq_len={seq_len}, got {self.prefix_tokens}")
        return seq_len - self.prefix_tokens


def prefix_offsets(num_train_tokens: int, spec: DistillSpec) -> np.ndarray:  # [num_sequences] int64
    """Seeded uniform start offsets of the prefixes in a training stream of `num_train_tokens` tokens."""
    if num_train_tokens < spec.prefix_tokens:
        raise ValueError(f"train stream: {num_train_tokens} tokens hold no prefix of {spec.prefix_tokens}")
    rng = np.random.default_rng([spec.seed, 0xD1571])
    return rng.integers(0, num_train_tokens - spec.prefix_tokens + 1, size=spec.num_sequences)


def training_prefixes(train_stream: np.ndarray, spec: DistillSpec) -> np.ndarray:  # [num_sequences, prefix_tokens]
    """The prefixes, each a slice of the training stream at `prefix_offsets`."""
    offsets = prefix_offsets(len(train_stream), spec)
    return np.stack([train_stream[o : o + spec.prefix_tokens] for o in offsets]).astype(np.int32)


def teacher_continuations(
    teacher: Any, prefixes: np.ndarray, continuation_tokens: int, spec: DistillSpec, log: Callable[[str], None] = print
) -> np.ndarray:  # prefixes [N, P] -> [N, continuation_tokens] int32
    """The teacher's continuations of every prefix, `batch_rows` rows per compiled decode (greedy at temperature
    0, else sampled with key (seed, chunk index)); rows never stop early (no stop tokens). A short last chunk is
    padded with copies of its first row so every call has the same shape (one compilation)."""
    from jspec.decode import decode

    strategy, options = ("greedy", {}) if spec.temperature == 0 else ("sample", {"temperature": float(spec.temperature)})
    rows = spec.batch_rows
    outputs, started = [], time.perf_counter()
    for chunk_index, start in enumerate(range(0, len(prefixes), rows)):
        chunk = prefixes[start : start + rows]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], rows - len(chunk), axis=0)]) if len(chunk) < rows else chunk
        result = decode(teacher, padded, strategy, max_new_tokens=continuation_tokens, stop_tokens=[],
                        key=spec.seed * 1_000_003 + chunk_index, **options)
        tokens = np.asarray(result.tokens)[: len(chunk)]
        if tokens.shape != (len(chunk), continuation_tokens) or (tokens < 0).any():
            raise RuntimeError(f"distill: the teacher returned {tokens.shape} tokens (some padding) for {len(chunk)} rows")
        outputs.append(tokens.astype(np.int32))
        done = start + len(chunk)
        if (chunk_index + 1) % _GENERATION_LOG_EVERY == 0 or done == len(prefixes):
            seconds = time.perf_counter() - started
            log(f"distill: {done}/{len(prefixes)} continuations, {done * continuation_tokens / seconds:,.0f} tokens/s")
    return np.concatenate(outputs)


def distilled_examples(train_stream: np.ndarray, seq_len: int, spec: DistillSpec, teacher: Any,
                       log: Callable[[str], None] = print) -> np.ndarray:  # [num_sequences, seq_len] int32
    """Each row: a training prefix, then the teacher's continuation of it."""
    prefixes = training_prefixes(np.asarray(train_stream), spec)
    continuations = teacher_continuations(teacher, prefixes, spec.continuation_tokens(seq_len), spec, log)
    return np.concatenate([prefixes, continuations], axis=1)


def packed_examples(examples: np.ndarray, eos_id: int) -> np.ndarray:  # [N, L] -> [N * L + 1] int32
    """The examples end to end with one EOS after the last: at stride L every window's first L tokens are one example."""
    return np.concatenate([examples.reshape(-1), np.asarray([eos_id])]).astype(np.int32)


def distilled_stream_digest(spec: DistillSpec, seq_len: int, train_digest: str, teacher_digest: str) -> str:
    """What a distilled stream depends on: the spec, the window length, the training data and the teacher."""
    key = json.dumps({"spec": dataclasses.asdict(spec), "seq_len": seq_len, "train": train_digest, "teacher": teacher_digest},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def teacher_digest(teacher: Any) -> str:
    """A digest of the teacher's weights and config (its continuations are a function of them)."""
    import jax

    digest = hashlib.sha256(repr(teacher.config).encode())
    for leaf in jax.tree.leaves(teacher.params):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()


def distilled_stream(train_stream: np.ndarray, seq_len: int, spec: DistillSpec, eos_id: int, run_dir: str | Path,
                     teacher: Any = None, log: Callable[[str], None] = print) -> np.ndarray:
    """The packed distilled training stream, read from `run_dir` when an earlier call saved it, else decoded and
    saved there (atomically). teacher: a loaded model (default: `jspec.load(spec.teacher, dtype="float32")`)."""
    if teacher is None:
        from jspec.loading import load

        teacher = load(spec.teacher, dtype="float32")
    train_stream = np.asarray(train_stream, dtype=np.int32)
    digest = distilled_stream_digest(spec, seq_len, hashlib.sha256(train_stream.tobytes()).hexdigest(), teacher_digest(teacher))
    path = Path(run_dir) / f"distilled-{digest}.npy"
    if path.is_file():
        log(f"distill: reusing {path}")
        return np.load(path)
    started = time.perf_counter()
    stream = packed_examples(distilled_examples(train_stream, seq_len, spec, teacher.without_tokenizer(), log), eos_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, stream)
    tmp.replace(path)
    log(f"distill: {spec.num_sequences} examples x {seq_len} tokens ({spec.num_sequences * spec.continuation_tokens(seq_len):,} "
        f"teacher tokens, temperature {spec.temperature}) in {time.perf_counter() - started:.0f}s -> {path}")
    return stream
