"""Times hivemind's ffn expert in one torch process, no network: forward (no grad), and forward + backward +
Adam step (ModuleBackend's per-batch work). Usage: bench_expert.py [HID_DIM] [BATCH] [ITERS]; prints one line
with the fastest and the median iteration (compare minima on shared machines)."""

import sys
import time

import torch

from hivemind.moe.server.layers import name_to_block

argv = sys.argv[1:] + ["1024", "256", "10"][len(sys.argv) - 1 :]
h, b, iters = (int(a) for a in argv[:3])
module = name_to_block["ffn"](h)
opt = torch.optim.Adam(module.parameters())
x = torch.randn(b, h)
g = torch.randn(b, h) * 1e-3


def forward():
    with torch.no_grad():
        module(x)


def backward():
    xr = x.detach().requires_grad_(True)
    torch.autograd.backward(module(xr), g)
    opt.step()
    opt.zero_grad()


def timed(f):
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    return ts[0], ts[len(ts) // 2]


forward()
backward()
fwd, bwd = timed(forward), timed(backward)
print(
    f"torch ffn h={h} batch={b} (min / median ms): forward {fwd[0]:.1f} / {fwd[1]:.1f}; "
    f"backward+Adam {bwd[0]:.1f} / {bwd[1]:.1f}. forward {b / fwd[0] * 1e3:.0f} samples/s, "
    f"server work {b / (fwd[0] + bwd[0]) * 1e3:.0f} samples/s (from minima)",
    flush=True,
)
