"""Tokenizer training and the packed-sequence data pipeline.

- `train_tokenizer`: a byte-level BPE (`tokenizers`: ByteLevel pre-tokenizer and decoder, `<|endoftext|>` as
  the one special token and EOS). Lossless: `decode(encode(text)) == text` for any text, non-ASCII included.
- `tokenize_documents`: one flat int32 token stream, documents in the given order, EOS after each.
- `PackedBatches`: the stream cut into windows of `seq_len + 1` tokens at stride `seq_len` (every token after
  the first is a target exactly once), visited in a seeded random order per epoch. `batch(step)` is a pure
  function of (stream, seq_len, batch_size, seed, step): the data position of a run is just its step count,
  so a resumed run sees exactly the batches an uninterrupted one would.
- `eval_windows`: the held-out stream's first windows in order (no shuffling), a fixed evaluation slice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from jspec.tokenizer import HFTokenizer

EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(texts: Sequence[str], vocab_size: int = 4096, min_frequency: int = 2) -> HFTokenizer:
    """Train a byte-level BPE tokenizer on `texts`; `<|endoftext|>` (id 0) is the EOS token.

    Deterministic for the same texts and settings (the `tokenizers` BPE trainer breaks count ties by pair).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size: expected at least 258 (256 bytes + EOS + merges), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    eos = tokenizer.token_to_id(EOS_TOKEN)
    return HFTokenizer(tokenizer, eos_token_ids=(eos,), bos_token_id=None)


def load_tokenizer(path: str | Path) -> HFTokenizer:
    """A tokenizer.json written by `train_tokenizer(...).save(path)`, with its EOS id set. A file that is not a
    readable tokenizer.json raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer: no tokenizer.json at {str(path)!r}")
    tokenizer = HFTokenizer.from_file(path)._tokenizer
    eos = tokenizer.token_to_id(EOS_TOKEN)
    if eos is None:
        raise ValueError(f"tokenizer {str(path)!r}: has no {EOS_TOKEN!r} token")
    return HFTokenizer(tokenizer, eos_token_ids=(eos,), bos_token_id=None, path=str(path))


def tokenizer_digest(tokenizer: HFTokenizer) -> str:
    return hashlib.sha256(tokenizer._tokenizer.to_str().encode()).hexdigest()


def tokenize_documents(tokenizer: HFTokenizer, texts: Sequence[str], eos_id: int | None = None) -> np.ndarray:
    """A flat int32 stream: text 0, EOS, text 1, EOS, ... (in the order given)."""
    if eos_id is None:
        if not tokenizer.eos_token_ids:
            raise ValueError("tokenizer: has no EOS token; pass eos_id")
        eos_id = tokenizer.eos_token_ids[0]
    encodings = tokenizer._tokenizer.encode_batch(list(texts), add_special_tokens=False)
    pieces = []
    for encoding in encodings:
        pieces.append(np.asarray(encoding.ids, dtype=np.int32))
        pieces.append(np.asarray([eos_id], dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)


def cached_token_stream(tokenizer: HFTokenizer, texts: Sequence[str], cache_dir: str | Path | None, key: str) -> np.ndarray:
    """`tokenize_documents`, cached as .npy under cache_dir by (tokenizer, key) so reruns skip tokenization."""
    if cache_dir is None:
        return tokenize_documents(tokenizer, texts)
    digest = hashlib.sha256(f"{tokenizer_digest(tokenizer)}:{key}".encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"tokens-{digest}.npy"
    if path.is_file():
        return np.load(path)
    stream = tokenize_documents(tokenizer, texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, stream)
    tmp.replace(path)
    return stream


def num_windows(num_tokens: int, seq_len: int, stride: int | None = None) -> int:
    """How many windows of seq_len + 1 tokens at `stride` (default seq_len: packed) a stream of num_tokens holds."""
    stride = stride or seq_len
    return max(0, (num_tokens - seq_len - 1) // stride + 1)


def window(stream: np.ndarray, index: int, seq_len: int, stride: int | None = None) -> np.ndarray:
    start = index * (stride or seq_len)
    return stream[start : start + seq_len + 1]


class PackedBatches:
    """Batches of packed windows [batch_size, seq_len + 1] (inputs = [:, :-1], targets = [:, 1:]).

    Epoch e visits every window once, in the order `permutation(seed, e)`; batch `step` takes the windows at
    flat positions step*batch_size ... (step+1)*batch_size - 1 of the concatenated epochs (batches may straddle
    epochs). Deterministic under the seed and resumable at any step.

    stride: where window i starts (i * stride); default seq_len (packed: each token after the first is a target
    once). A stream of whole examples of seq_len + 1 tokens each uses stride seq_len + 1: one example per window.
    """

    def __init__(self, stream: np.ndarray, seq_len: int, batch_size: int, seed: int = 0, stride: int | None = None):
        if seq_len <= 0:
            raise ValueError(f"seq_len: expected a positive int, got {seq_len}")
        if batch_size <= 0:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
        self.stream = np.asarray(stream, dtype=np.int32)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.stride = stride or seq_len
        self.num_windows = num_windows(len(self.stream), seq_len, self.stride)
        if self.num_windows == 0:
            raise ValueError(f"stream: {len(self.stream)} tokens hold no window of seq_len + 1 = {seq_len + 1}")
        self._epoch_orders: dict[int, np.ndarray] = {}

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._epoch_orders:
            rng = np.random.default_rng([self.seed, epoch])
            if len(self._epoch_orders) >= 2:  # a batch spans at most two epochs: memory stays flat
                self._epoch_orders.pop(min(self._epoch_orders))
            self._epoch_orders[epoch] = rng.permutation(self.num_windows)
        return self._epoch_orders[epoch]

    def window_indices(self, step: int) -> np.ndarray:
        if step < 0:
            raise ValueError(f"step: expected a non-negative int, got {step}")
        flat = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, offsets = np.divmod(flat, self.num_windows)
        return np.asarray([self.epoch_order(int(e))[int(o)] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def batch(self, step: int) -> np.ndarray:  # [batch_size, seq_len + 1] int32
        return np.stack([window(self.stream, int(i), self.seq_len, self.stride) for i in self.window_indices(step)])

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.num_windows

    def iterate(self, start_step: int = 0) -> Iterator[np.ndarray]:
        step = start_step
        while True:
            yield self.batch(step)
            step += 1


def eval_windows(stream: np.ndarray, seq_len: int, max_windows: int | None = None, stride: int | None = None) -> np.ndarray:
    """The stream's first windows in order (at `stride`, default seq_len; length seq_len + 1): [N, seq_len + 1] int32."""
    count = num_windows(len(stream), seq_len, stride)
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"eval stream: {len(stream)} tokens hold no window of seq_len + 1 = {seq_len + 1}")
    return np.stack([window(stream, i, seq_len, stride) for i in range(count)]).astype(np.int32)
