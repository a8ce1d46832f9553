"""Free-list slots + gather vs the paper's contiguous slots (compute on a slice) vs
computing on the whole cache: one q4 projection of SmolLM2's shape (576 x 1536, 25%
selected), MLX CPU. The gap between gather and slice bounds what keeping slots
contiguous (moving the last rows into every hole) could save.

    python benchmarks/gather_vs_slice.py
"""

import time

import mlx.core as mx
import numpy as np

D, N, K, REPEATS = 576, 1536, 384, 300


def main():
    packed, scales, biases = mx.quantize(
        mx.random.normal((N, D)), group_size=32, bits=4
    )
    cache = (packed, scales.astype(mx.float32), biases.astype(mx.float32))
    mx.eval(cache)
    x = mx.random.normal((1, 1, D))
    ids = mx.array(np.sort(np.random.choice(N, K, replace=False)).astype(np.uint32))

    def project(w):
        mx.eval(mx.quantized_matmul(x, *w, transpose=True, group_size=32, bits=4))

    cases = {
        "free list: gather the selected rows": lambda: project(
            [mx.take(a, ids, axis=0) for a in cache]
        ),
        "contiguous: slice the first rows": lambda: project([a[:K] for a in cache]),
        "whole cache, masked after": lambda: project(cache),
    }
    for _ in range(2):  # the second pass is the measurement
        results = {}
        for name, case in cases.items():
            tic = time.perf_counter()
            for _ in range(REPEATS):
                case()
            results[name] = (time.perf_counter() - tic) / REPEATS * 1e6
    for name, us in results.items():
        print(f"{name:40s} {us:6.0f} us per projection")


if __name__ == "__main__":
    main()
