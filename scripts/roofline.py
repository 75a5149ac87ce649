"""Machine rooflines for the default model's shapes: float32 matmul rates and memory copy rate.

    python scripts/roofline.py

Prints GFLOP/s of `x @ w` over 30 separate weight arrays (as the model's unrolled layers run them)
at several row counts, a 2048^3 matmul, and numpy's copy bandwidth.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def matmul_rate(rows: int, din: int, dout: int, layers: int = 30, repeats: int = 10) -> float:
    x = jnp.ones((rows, din), jnp.float32)
    ws = [jax.random.normal(jax.random.key(i), (din, dout), jnp.float32) for i in range(layers)]
    f = jax.jit(lambda x, ws: sum(x @ w for w in ws))
    jax.block_until_ready(f(x, ws))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(f(x, ws))
    seconds = (time.perf_counter() - start) / repeats
    return 2 * rows * din * dout * layers / seconds / 1e9


def copy_rate(megabytes: int = 256, repeats: int = 10) -> float:
    a = np.ones(megabytes * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    start = time.perf_counter()
    for _ in range(repeats):
        np.copyto(b, a)
    return 2 * a.nbytes * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    for rows in (1, 32, 128, 512):
        rates = [matmul_rate(rows, 576, 1536), matmul_rate(rows, 1536, 576)]
        print(f"rows {rows:4d}: 576x1536 {rates[0]:6.1f} GFLOP/s, 1536x576 {rates[1]:6.1f} GFLOP/s")
    print(f"2048^3 matmul: {matmul_rate(2048, 2048, 2048, layers=1, repeats=3):.1f} GFLOP/s")
    print(f"numpy copy (read + write): {copy_rate():.1f} GB/s")


if __name__ == "__main__":
    main()
