#!/usr/bin/env python3
"""hivemind's side of `cargo xtask bench`: serialize_torch_tensor + deserialize_torch_tensor of a seeded
randn float32 vector under every codec, the measure of hivemind's own
benchmarks/benchmark_tensor_compression.py (one timed round trip, tensor -> runtime_pb2.Tensor -> tensor).

Prints one JSON line per codec: {"codec", "numel", "iters", "median_s", "min_s", "gbps"} where gbps is raw
float32 bytes (4 * numel) divided by the median round-trip time, in 1e9 bytes per second.

    python bench_tensor_compression.py [--size 10000000] [--iters 30] [--codecs NONE FLOAT16 ...]
"""
import argparse
import json
import logging
import os
import statistics
import time
import warnings

os.environ.setdefault("HIVEMIND_QUIET", "1")
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torch  # noqa: E402

from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor  # noqa: E402
from hivemind.proto.runtime_pb2 import CompressionType  # noqa: E402

CODECS = ["NONE", "FLOAT16", "MEANSTD_16BIT", "UNIFORM_8BIT", "QUANTILE_8BIT", "BLOCKWISE_8BIT"]


def round_trip(tensor: torch.Tensor, codec: int) -> float:
    t = time.perf_counter()
    deserialize_torch_tensor(serialize_torch_tensor(tensor, codec))
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=10_000_000)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=7348)
    p.add_argument("--codecs", nargs="*", choices=CODECS, default=CODECS)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    x = torch.randn(args.size, dtype=torch.float32)
    for name in args.codecs:
        codec = CompressionType.Value(name)
        for _ in range(args.warmup):
            round_trip(x, codec)
        times = [round_trip(x, codec) for _ in range(args.iters)]
        median = statistics.median(times)
        print(
            json.dumps(
                {
                    "codec": name,
                    "numel": args.size,
                    "iters": args.iters,
                    "median_s": median,
                    "min_s": min(times),
                    "gbps": 4 * args.size / median / 1e9,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
