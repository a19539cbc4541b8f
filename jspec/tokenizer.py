"""Tokenizers. Every tokenizer offers `encode(str) -> list[int]`, `decode(list[int]) -> str`, `vocab_size`,
`eos_token_ids`, and `bos_token_id` (None where the model takes none)."""

from __future__ import annotations

from typing import Sequence


class ByteTokenizer:
    """Bytes 0..255 map to ids 0..255, then the special tokens <pad>, <bos>, <eos>. Lossless for any text.

    Used by random stand-in models and tests; trained models use a byte-level BPE tokenizer.
    """

    num_bytes = 256

    def __init__(self):
        self.pad_token_id = 256
        self.bos_token_id = 257
        self.eos_token_id = 258
        self.vocab_size = 259

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id,)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < self.num_bytes)
        return data.decode("utf-8", errors="replace")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)
