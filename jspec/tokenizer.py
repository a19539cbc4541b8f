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


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (the `tokenizers` library): byte-level BPE and the other models it reads.

    encode/decode are the library's own; `decode(encode(text)) == text` for byte-level BPE tokenizers.
    Special tokens are added by `encode` only where the tokenizer's post-processor adds them (never here by
    default: `add_special_tokens=False`), so prompts are exactly the text's tokens.
    """

    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...] = (), bos_token_id: int | None = None, path: str | None = None):
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._eos_token_ids = tuple(eos_token_ids)
        self.bos_token_id = bos_token_id
        self.path = path
        self._digest = hash(tokenizer.to_str())  # computed once: tokenizers compare by content

    @classmethod
    def from_file(cls, path, eos_token_ids: Sequence[int] = (), bos_token_id: int | None = None) -> "HFTokenizer":
        """Read a tokenizer.json. A file the `tokenizers` library cannot read raises ValueError naming the file."""
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the library raises a bare Exception for malformed JSON or an unknown model
            message = " ".join(str(error).split()) or type(error).__name__
            raise ValueError(f"tokenizer file {str(path)!r} cannot be read as a tokenizer.json ({message})") from None
        return cls(tokenizer, tuple(eos_token_ids), bos_token_id, str(path))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(int(token_id))

    def to_str(self) -> str:
        """The tokenizer.json text."""
        return self._tokenizer.to_str()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path) -> None:
        self._tokenizer.save(str(path))

    def with_special_token(self, token: str) -> tuple["HFTokenizer", int]:
        """This tokenizer with `token` added as a special token (if it is not there yet), and its id.
        Text that does not contain the token's literal string encodes exactly as before."""
        from tokenizers import AddedToken, Tokenizer

        existing = self.token_to_id(token)
        if existing is not None:
            return self, existing
        copy = Tokenizer.from_str(self.to_str())
        copy.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        return HFTokenizer(copy, self._eos_token_ids, self.bos_token_id), copy.token_to_id(token)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFTokenizer) and other._digest == self._digest and other.to_str() == self.to_str()

    def __hash__(self) -> int:
        return self._digest
