"""How much a row's logits move with the number of rows beside it (XLA's batch-size dependence), per dtype.

demo-code-dllm runs random canvases of a few widths bidirectionally: 4 rows, then the same 4 rows each repeated r
times (the shape a FreeDave verification with r drafts has), then each row alone. A row computed independently of
the batch gives 0. The largest change bounds the near-ties that can separate FreeDave from dllm_static (README).

    python benchmarks/bench_batch_invariance.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jspec


def main() -> None:
    rng = np.random.default_rng(0)
    print("dtype      width  rows x2     x3     x5     x8    alone")
    for dtype in ("bfloat16", "float32"):
        model = jspec.load("demo-code-dllm", dtype=dtype).without_tokenizer()
        forward = jax.jit(lambda tokens, positions, mask: model.forward(tokens, positions, None, mask)[0])
        for width in (40, 80, 97, 130):
            tokens = jnp.asarray(rng.integers(5, model.config.vocab_size - 1, (4, width)), jnp.int32)
            positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32)[None], (4, width))
            mask = jnp.asarray(rng.random((4, width, width)) < 0.9)
            reference = np.asarray(forward(tokens, positions, mask))
            changes = []
            for repeats in (2, 3, 5, 8):
                rows = jnp.repeat(jnp.arange(4), repeats)
                repeated = np.asarray(forward(tokens[rows], positions[rows], mask[rows]))[::repeats]
                changes.append(np.abs(repeated - reference).max())
            alone = [np.asarray(forward(tokens[r : r + 1], positions[r : r + 1], mask[r : r + 1]))[0] for r in range(4)]
            changes.append(np.abs(np.stack(alone) - reference).max())
            print(f"{dtype:9s}  {width:5d}  " + "  ".join(f"{c:.1e}" for c in changes), flush=True)


if __name__ == "__main__":
    main()
