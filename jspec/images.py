"""Image-token models: class prompts, generated token grids as pictures, and a dependency-free PNG writer.

The shipped `demo-digits` model writes 8x8 handwritten digits (scikit-learn's digits data) one pixel at a time:
a sequence is [class token, 64 pixel tokens in row-major order, EOS]. Its vocabulary (`DIGITS_TOKENS`):

    "0" ... "16"            the 17 grey levels of a pixel (0: background, 16: full ink), ids 0-16
    "<digit_0>" ... "<digit_9>"   the class tokens, ids 17-26 (the prompt)
    "<|endoftext|>"         EOS, id 27 (after the 64th pixel); "<unk>" id 28 (text outside the vocabulary)

    import jspec
    model = jspec.load("demo-digits")
    images, output = jspec.images.generate_digits(model, [3, 7], num_samples=8, key=0)   # images [16, 8, 8]
    jspec.images.write_png("digits.png", jspec.images.image_grid(images, columns=8))

Every function finds the token ids through the model's tokenizer, so any model with these tokens works, with any
decoding strategy (`generate_digits(..., strategy="sjd")` where that strategy is registered).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jspec.validation import ArgumentError, check_int

IMAGE_SIZE = 8  # pixels per side
NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE
NUM_LEVELS = 17  # grey levels 0..16
NUM_CLASSES = 10
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
PIXEL_TOKENS = tuple(str(level) for level in range(NUM_LEVELS))
CLASS_TOKENS = tuple(f"<digit_{digit}>" for digit in range(NUM_CLASSES))
DIGITS_TOKENS = PIXEL_TOKENS + CLASS_TOKENS + (EOS_TOKEN, UNK_TOKEN)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def digits_tokenizer():
    """The demo-digits tokenizer (`DIGITS_TOKENS`): a word-level `tokenizers` tokenizer over whitespace-separated
    tokens, EOS `<|endoftext|>`. Deterministic: the same tokenizer.json every time."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    from jspec.tokenizer import HFTokenizer

    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(DIGITS_TOKENS)}, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return HFTokenizer(tokenizer, eos_token_ids=(DIGITS_TOKENS.index(EOS_TOKEN),), bos_token_id=None)


def _token_ids(model: Any, tokens: Sequence[str], argument: str) -> np.ndarray:
    tokenizer = getattr(model, "tokenizer", model)
    ids = [tokenizer.token_to_id(token) if hasattr(tokenizer, "token_to_id") else None for token in tokens]
    if any(i is None for i in ids):
        name = getattr(getattr(model, "config", None), "name", None) or type(tokenizer).__name__
        raise ArgumentError(
            f"{argument}: {name!r} is not an image model (its tokenizer lacks the tokens {tokens[0]!r} ... "
            f"{tokens[-1]!r}); use demo-digits or a model with the same tokens"
        )
    return np.asarray(ids, np.int64)


def check_image_model(model: Any, argument: str = "model") -> None:
    """ArgumentError naming `argument` unless the model's tokenizer has the pixel and class tokens."""
    _token_ids(model, PIXEL_TOKENS, argument)
    _token_ids(model, CLASS_TOKENS, argument)


def class_token(digit: int) -> str:
    """The class token's text, e.g. `<digit_3>`; ArgumentError naming `digit` outside 0-9."""
    return CLASS_TOKENS[check_int("digit", digit, 0, NUM_CLASSES - 1)]


def class_prompt(model: Any, digit: int) -> list[int]:
    """The prompt (token ids) asking `model` for a picture of `digit`: [its class token]. ArgumentError naming
    `digit` outside 0-9, or `model` for a model without the class tokens."""
    digit = check_int("digit", digit, 0, NUM_CLASSES - 1)
    return [int(_token_ids(model, CLASS_TOKENS, "model")[digit])]


def class_prompts(model: Any, digits: Sequence[int]) -> list[list[int]]:
    """One prompt per digit (`class_prompt`), a ragged batch `jspec.decode` takes."""
    if isinstance(digits, (int, np.integer)) or not len(digits):
        raise ArgumentError(f"digits: expected a non-empty sequence of ints 0-9, got {digits!r}")
    return [class_prompt(model, digit) for digit in digits]


def tokens_to_images(model: Any, rows: Any) -> np.ndarray:
    """Generated rows as images [N, 8, 8] int (grey levels 0-16).

    rows: a `DecodeOutput` (its generated tokens), a list of token-id lists, or an int array [N, T] (-1 padded);
    each row's first 64 tokens are the pixels, row-major. A token that is not a pixel (EOS, a class token,
    padding) or a position past a short row's end is drawn as background (0)."""
    if hasattr(rows, "sequences"):
        rows = rows.sequences()
    rows = [np.asarray(row, np.int64).reshape(-1)[:NUM_PIXELS] for row in rows]
    pixel_ids = _token_ids(model, PIXEL_TOKENS, "model")
    lookup = np.zeros(int(pixel_ids.max()) + 1, np.int64)  # token id -> grey level; other ids -> 0
    lookup[pixel_ids] = np.arange(NUM_LEVELS)
    images = np.zeros((len(rows), NUM_PIXELS), np.int64)
    for index, row in enumerate(rows):
        known = (row >= 0) & (row < len(lookup))
        images[index, : len(row)] = np.where(known, lookup[np.where(known, row, 0)], 0)
    return images.reshape(len(rows), IMAGE_SIZE, IMAGE_SIZE)


def generate_digits(model: Any, digits: Sequence[int], strategy: Any = "sample", *, num_samples: int = 1,
                    key: Any = 0, **options: Any) -> tuple[np.ndarray, Any]:
    """Sample pictures of `digits` with any decoding strategy: `num_samples` per digit (consecutive), 64 new
    tokens each. Returns (images [len(digits) * num_samples, 8, 8] grey levels, the `DecodeOutput`)."""
    from jspec.decode import decode

    output = decode(model, class_prompts(model, digits), strategy, max_new_tokens=NUM_PIXELS,
                    num_samples=num_samples, key=key, **options)
    return tokens_to_images(model, output), output


def image_grid(images: Any, columns: int | None = None, scale: int = 4, gap: int = 1) -> np.ndarray:
    """Images [N, h, w] of grey levels 0-16 (16: ink) tiled into one picture [H, W] uint8, dark ink on white,
    `columns` per row (default: about square), each pixel drawn as a scale x scale block, `gap` grey pixels
    between tiles and around the edge."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[0] == 0:
        raise ArgumentError(f"images: expected an array [N, h, w] with N >= 1, got shape {images.shape}")
    count, height, width = images.shape
    columns = int(np.ceil(np.sqrt(count))) if columns is None else check_int("columns", columns, 1)
    scale, gap = check_int("scale", scale, 1), check_int("gap", gap, 0)
    grid_rows = -(-count // columns)
    tile_h, tile_w = height * scale, width * scale
    canvas = np.full((gap + grid_rows * (tile_h + gap), gap + columns * (tile_w + gap)), 128, np.uint8)
    grey = (255 - np.round(np.clip(images, 0, NUM_LEVELS - 1) * 255 / (NUM_LEVELS - 1))).astype(np.uint8)
    for index in range(count):
        top = gap + (index // columns) * (tile_h + gap)
        left = gap + (index % columns) * (tile_w + gap)
        canvas[top : top + tile_h, left : left + tile_w] = np.kron(grey[index], np.ones((scale, scale), np.uint8))
    return canvas


def png_bytes(pixels: Any) -> bytes:
    """A PNG file's bytes for pixels [H, W] (8-bit grey) or [H, W, 3] (8-bit RGB), uint8: IHDR, one zlib IDAT of
    the rows (filter type 0 each), IEND. Lossless: decompressing the IDAT gives back each row after its filter
    byte."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3) or 0 in pixels.shape:
        raise ArgumentError(f"pixels: expected a non-empty uint8 array [H, W] or [H, W, 3], got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    color_type = 0 if pixels.ndim == 2 else 2

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = np.ascontiguousarray(pixels).reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def write_png(path: str | Path, pixels: Any) -> Path:
    """Write `png_bytes(pixels)` to `path`; returns the path."""
    path = Path(path)
    path.write_bytes(png_bytes(pixels))
    return path
