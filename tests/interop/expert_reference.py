"""Reference numerics for Apiary's expert zoo, computed by hivemind's own expert classes.

Usage: expert_reference.py DIR --kind KIND --hid-dim H [--steps N] [--optimizer adam|adamw|sgd] [--lr LR]
       [--momentum M] [--weight-decay WD] [--scheduler none|linear] [--warmup W] [--training T] [--clip C]

Reads DIR/weights.safetensors (the torch module's state_dict names) and DIR/inputs.safetensors
(input0, input1 (mask, 0/1 as f32) where the expert takes one, grad0), builds hivemind's module from
hivemind.moe.server.layers.name_to_block, and writes DIR/reference.safetensors with:
  output0                 forward outputs (no grad)
  grad_input{i}           input gradients of the first backward
  param_grad.NAME         parameter gradients of the first backward (before clipping)
  step{k}.NAME            parameters after k backward calls through hivemind's ModuleBackend (k = 1..N),
                          each with the server's optimizer, scheduler and ClippingWrapper.
The safetensors format is read and written by hand (the venv has no `safetensors` package).
"""

import argparse
import json
import struct
import sys
from functools import partial

import numpy as np
import torch

from hivemind.moe.server.layers import name_to_block, name_to_input, schedule_name_to_scheduler
from hivemind.moe.server.layers.optim import ClippingWrapper
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.utils.tensor_descr import BatchTensorDescriptor

DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "U8": np.uint8}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        arr = np.frombuffer(body[start:end], dtype=DTYPES[meta["dtype"]]).reshape(meta["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out


def write_safetensors(path, tensors):
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        arr = tensors[name].detach().cpu().contiguous().to(torch.float32).numpy()
        raw = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    hb = json.dumps(header).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + b"".join(chunks))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--kind", required=True)
    p.add_argument("--hid-dim", type=int, required=True)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--scheduler", default="none")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--training", type=int, default=1)
    p.add_argument("--clip", type=float, default=None)
    a = p.parse_args()

    torch.manual_seed(0)
    module = name_to_block[a.kind](a.hid_dim)
    module.load_state_dict(read_safetensors(f"{a.dir}/weights.safetensors"))
    if a.kind == "transformer":
        module.eval()  # Apiary's transformer runs without dropout
    else:
        module.train()

    raw = read_safetensors(f"{a.dir}/inputs.safetensors")
    args = [raw["input0"]]
    if "input1" in raw:
        mask = raw["input1"]
        args.append(mask.bool() if a.kind == "transformer" else mask.long())
    grad0 = raw["grad0"]

    result = {}
    with torch.no_grad():
        result["output0"] = module(*args)

    # gradients of inputs and parameters, as ModuleBackend.backward computes them
    leaf = [t.detach().requires_grad_(True) if t.is_floating_point() else t.detach() for t in args]
    out = module(*leaf)
    torch.autograd.backward((out,), grad_tensors=(grad0,))
    for i, t in enumerate(leaf):
        result[f"grad_input{i}"] = t.grad if t.grad is not None else torch.zeros_like(t, dtype=torch.float32)
    for name, param in module.named_parameters():
        result[f"param_grad.{name}"] = param.grad if param.grad is not None else torch.zeros_like(param)
    module.zero_grad(set_to_none=True)

    # the server's training setup (hivemind.moe.server.Server.create) and ModuleBackend.backward
    if a.optimizer == "adam":
        optim_cls = torch.optim.Adam if a.weight_decay is None else partial(torch.optim.Adam, weight_decay=a.weight_decay)
    elif a.optimizer == "adamw":
        optim_cls = torch.optim.AdamW if a.weight_decay is None else partial(torch.optim.AdamW, weight_decay=a.weight_decay)
    elif a.optimizer == "sgd":
        optim_cls = partial(torch.optim.SGD, momentum=a.momentum, weight_decay=a.weight_decay or 0.0)
    else:
        sys.exit(f"unknown optimizer {a.optimizer}")
    optimizer = optim_cls(module.parameters(), lr=a.lr)
    scheduler_cls = schedule_name_to_scheduler[a.scheduler]
    scheduler = (
        scheduler_cls(optimizer, num_warmup_steps=a.warmup, num_training_steps=a.training)
        if scheduler_cls is not None
        else None
    )
    if a.clip is not None:
        optimizer = ClippingWrapper(optimizer, a.clip)
    sample = name_to_input[a.kind](4, a.hid_dim)
    sample = sample if isinstance(sample, tuple) else (sample,)
    backend = ModuleBackend(
        f"{a.kind}.0",
        module,
        optimizer=optimizer,
        scheduler=scheduler,
        args_schema=tuple(BatchTensorDescriptor.from_tensor(s) for s in sample),
        outputs_schema=BatchTensorDescriptor.from_tensor(out.detach()[:1]),
        max_batch_size=1 << 20,
    )
    for k in range(1, a.steps + 1):
        backend.backward(*[t.clone() for t in args], grad0.clone())
        for name, param in module.state_dict().items():
            result[f"step{k}.{name}"] = param.clone()

    write_safetensors(f"{a.dir}/reference.safetensors", result)


if __name__ == "__main__":
    main()
