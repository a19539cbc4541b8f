"""Stop strings: a row ends when its text ends with one of the strings, matched on device by token tables.

Semantics are transformers' `StopStringCriteria` (generate(stop_strings=..., tokenizer=...)): after each emitted
token, the row stops when the text of its tokens (the prompt's included) ends with a stop string that the last
token helps to complete: the last token starts with the end of the stop string (it may run past it), and the
tokens before it spell the rest (the first of them may start before the string). The token that completes the
string is the row's last token; nothing is cut out of it, so the text ends with the stop string, followed by the
rest of that last token when it runs past the string. A string that appears inside the text without touching its
last token (it was already there before the token was emitted) does not stop the row, as in transformers.

How: the tables transformers builds (each token's byte string; per stop string, the positions inside the string
where the token can sit, counted from the end, and the lengths of the string's end the token can start with)
are computed once per tokenizer and set of strings, and matched against the last `window` tokens of each row
inside the compiled step, so no host round trip happens per token. Token strings are bytes: a byte-level BPE
tokenizer's tokens map to their bytes exactly (a string split inside a multi-byte character still matches); other
tokenizers' tokens are decoded after a fixed prefix, as transformers does. Matching is exact when decoding is
concatenative (decode(a + b) == decode(a) + decode(b)), which holds for byte-level tokenizers.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jspec.validation import ArgumentError, fail

_PREFIX = "abcdef"  # transformers' static prefix for tokenizers whose tokens carry space markers


@struct.dataclass
class StopStrings:
    """Per-token match tables for a set of stop strings (transformers' StopStringCriteria embedding)."""

    table: jax.Array  # [V + 1, S * (P + E) + 1] int32: valid positions, end overlaps, token length; row V: no token
    target_lengths: jax.Array  # [S] int32: each stop string's length in bytes
    num_strings: int = struct.field(pytree_node=False)
    max_positions: int = struct.field(pytree_node=False)  # P
    max_end_lengths: int = struct.field(pytree_node=False)  # E
    window: int = struct.field(pytree_node=False)  # tokens a match can span: the longest string's length

    def matches(self, tail: jax.Array) -> jax.Array:  # tail [R, window] int32, oldest first, -1: none -> [R] bool
        """Whether the text of each row of tokens ends with a stop string its last token helps complete."""
        rows, strings = tail.shape[0], self.num_strings
        no_token = self.table.shape[0] - 1
        flipped = tail[:, ::-1]
        ids = jnp.where((flipped < 0) | (flipped > no_token), no_token, flipped)
        embedded = self.table[ids]  # [R, W, C]
        split = self.max_positions * strings
        valid_positions = embedded[:, 1:, :split].reshape(rows, -1, strings, self.max_positions)
        end_lengths = embedded[:, :1, split:-1].reshape(rows, 1, strings, self.max_end_lengths)
        lengths = jnp.broadcast_to(embedded[:, 1:, None, -1:], (rows, tail.shape[1] - 1, strings, self.max_end_lengths))
        matched = jnp.cumsum(jnp.concatenate([end_lengths, lengths], axis=1), axis=1)  # [R, W, S, E]
        later = jnp.any(matched[:, :-1, :, None, :] == valid_positions[:, :, :, :, None], axis=-2)
        match = jnp.concatenate([end_lengths > 0, later], axis=1)
        unbroken = jnp.cumsum(~match, axis=1) == 0
        return jnp.any(jnp.max(matched * unbroken, axis=(1, 3)) >= self.target_lengths[None, :], axis=-1)


def check_stop(stop: Any, tokenizer: Any) -> tuple[str, ...] | None:
    """The stop strings of `stop=` (a str or a list of str; None or [] for none). Raises ArgumentError naming `stop`
    for an empty string, a non-string, or stop strings without a tokenizer."""
    if stop is None:
        return None
    strings = [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) for s in strings):
        fail("stop", "a non-empty str or a list of them", stop)
    if any(s == "" for s in strings):
        fail("stop", "non-empty strings (an empty stop string would end every row at once)", stop)
    if not strings:
        return None
    if tokenizer is None:
        raise ArgumentError("stop: stop strings need a model with a tokenizer (to know each token's text); "
                            "load the model with its tokenizer or use stop_tokens")
    return tuple(dict.fromkeys(strings))


def stop_strings(tokenizer: Any, strings: Sequence[str], vocab_size: int) -> StopStrings:
    """The match tables of `strings` for `tokenizer` over ids [0, vocab_size) (ids the tokenizer lacks: empty)."""
    table, target_lengths, positions, ends = _tables(tokenizer, tuple(strings), int(vocab_size))
    return StopStrings(table=jnp.asarray(table), target_lengths=jnp.asarray(target_lengths), num_strings=len(strings),
                       max_positions=positions, max_end_lengths=ends, window=int(max(target_lengths)))


@functools.lru_cache(maxsize=8)
def _tables(tokenizer: Any, strings: tuple[str, ...], vocab_size: int):
    targets = [s.encode("utf-8") for s in strings]
    tokens = token_bytes(tokenizer, vocab_size)
    positions: list[dict[int, list[int]]] = []
    overlaps: list[dict[int, list[int]]] = []
    for target in targets:  # transformers' _stop_string_get_matching_positions, on bytes
        reversed_target = target[::-1]
        valid, ends = {}, {}
        for index, token in enumerate(tokens):
            if not token:
                continue
            reversed_token = token[::-1]
            found = []
            i = reversed_target.find(reversed_token[:1], 1)
            while 0 <= i < len(target):
                if reversed_token.startswith(reversed_target[i : i + len(token)]):
                    found.append(i)
                i = reversed_target.find(reversed_token[:1], i + 1)
            lengths = []
            i = token.find(target[-1:])
            while i >= 0:
                overlap = min(i + 1, len(target))
                if token[i + 1 - overlap : i + 1] == target[-overlap:]:
                    lengths.append(overlap)
                i = token.find(target[-1:], i + 1)
            if found:
                valid[index] = found
            if lengths:
                ends[index] = lengths
        if not ends:
            raise ArgumentError(f"stop: no token of the tokenizer can end the stop string {target.decode()!r}")
        positions.append(valid)
        overlaps.append(ends)
    max_positions = max([len(v) for p in positions for v in p.values()] or [1])
    max_ends = max(len(v) for p in overlaps for v in p.values())
    count = len(targets)
    table = np.full((vocab_size + 1, count * (max_positions + max_ends) + 1), -1, np.int32)
    for s in range(count):
        for index, found in positions[s].items():
            table[index, max_positions * s : max_positions * s + len(found)] = found
        start = max_positions * count + max_ends * s
        for index, lengths in overlaps[s].items():
            table[index, start : start + len(lengths)] = lengths
    table[:vocab_size, -1] = [len(t) for t in tokens]
    return table, np.asarray([len(t) for t in targets], np.int32), max_positions, max_ends


def token_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """Each token id's text as bytes, as decoding it inside a sequence produces it."""
    if hasattr(tokenizer, "num_bytes"):  # jspec's ByteTokenizer: ids below num_bytes are bytes, the rest decode to ""
        return [bytes([i]) if i < tokenizer.num_bytes else b"" for i in range(vocab_size)]
    byte_level = _byte_level_decoder(tokenizer)
    if byte_level is not None:
        result = []
        for index in range(vocab_size):
            piece = tokenizer.id_to_token(index)
            if piece is None:
                result.append(b"")
            elif all(char in byte_level for char in piece):
                result.append(bytes(byte_level[char] for char in piece))
            else:
                result.append(tokenizer.decode([index]).encode("utf-8"))
        return result
    prefix = tokenizer.encode(_PREFIX)
    result = []
    for index in range(vocab_size):
        text = tokenizer.decode(list(prefix) + [index])
        result.append(text[text.index(_PREFIX) + len(_PREFIX) :].encode("utf-8") if _PREFIX in text else b"")
    return result


def _byte_level_decoder(tokenizer: Any) -> dict[str, int] | None:
    """The byte-level BPE map (unicode char -> byte) when the tokenizer's decoder is byte-level, else None."""
    to_str = getattr(tokenizer, "to_str", None)
    if to_str is None or not _has_type(json.loads(to_str()).get("decoder"), "ByteLevel"):
        return None
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = printable[:]
    for byte in range(256):  # GPT-2's bytes_to_unicode: the other bytes map to 256, 257, ...
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + len(characters) - 188)
    return {chr(c): b for b, c in zip(printable, characters)}


def _has_type(config: Any, name: str) -> bool:
    if isinstance(config, dict):
        return config.get("type") == name or any(_has_type(value, name) for value in config.values())
    return isinstance(config, list) and any(_has_type(value, name) for value in config)


def prompt_tails(tokens: jax.Array, lengths: jax.Array, window: int) -> jax.Array:
    """The last `window` tokens of each prompt [B, window] (tokens [B, T] right-padded, lengths [B]), -1 before the
    prompt's start."""
    index = lengths[:, None] - window + jnp.arange(window)[None, :]
    taken = jnp.take_along_axis(tokens, jnp.clip(index, 0, tokens.shape[1] - 1), axis=1)
    return jnp.where(index >= 0, taken, -1).astype(jnp.int32)
