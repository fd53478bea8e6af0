"""Golden tensor vectors: hivemind 1.1.12's serialize_torch_tensor / deserialize_torch_tensor under all six
codecs, and utils/streaming.py's split_for_streaming / combine_from_streaming, for apiary-wire's tests.

A vector set is a folder with `index.json` and one binary blob `tensors.bin`. Byte arrays in the index are
references into the blob, `{"at": offset, "len": n}`, or, for large arrays kept out of the committed set and
for stream parts beyond 4 KiB, only a digest `{"len": n, "sha256": "<hex>"}`. Each case is one seeded input
tensor:

    {"name", "dtype", "shape", "requires_grad", "original": ref (raw little-endian data; bfloat16 as its bits),
     "codecs": {"NONE": {"proto": ref (runtime_pb2.Tensor.SerializeToString()),
                         "decoded": ref, "decoded_dtype", "decoded_shape", "decoded_requires_grad",
                         "streams": [{"chunk_size", "parts": [ref, ...], "combined": ref}]},
                "FLOAT16": {"encode_error": "unsupported_dtype" | "scalar" | "empty", "message"}, ...}}

Command line (through golden.py):

    golden.py tensors generate OUT_DIR [--numel N]   # the large set made at test time (float32, every codec)
    golden.py tensors decode IN_DIR OUT_DIR          # hivemind decodes Apiary-made protos (see decode())
"""
import argparse
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("HIVEMIND_QUIET", "1")
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torch  # noqa: E402

import hivemind  # noqa: E402
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor  # noqa: E402
from hivemind.proto import runtime_pb2  # noqa: E402
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming  # noqa: E402

CODECS = ["NONE", "FLOAT16", "MEANSTD_16BIT", "UNIFORM_8BIT", "QUANTILE_8BIT", "BLOCKWISE_8BIT"]
DEFAULT_CHUNK = 2**16  # STREAMING_CHUNK_SIZE_BYTES
MOE_CHUNK = 4 * 2**20  # DEFAULT_MAX_MSG_SIZE
MAX_PARTS = 64


def digest(b: bytes) -> dict:
    return {"len": len(b), "sha256": hashlib.sha256(b).hexdigest()}


class Blob:
    """Append-only byte store; identical byte strings (or ones already inside a stored array) are shared."""

    def __init__(self, inline_limit=None):
        self.data = bytearray()
        self.inline_limit = inline_limit

    def add(self, b: bytes, force_inline=False) -> dict:
        b = bytes(b)
        if len(b) >= 8:
            at = self.data.find(b)
            if at >= 0:
                return {"at": at, "len": len(b)}
        if not force_inline and self.inline_limit is not None and len(b) > self.inline_limit:
            return digest(b)
        at = len(self.data)
        self.data += b
        return {"at": at, "len": len(b)}


def raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def classify(err: Exception, t: torch.Tensor, codec: str) -> str:
    msg = str(err)
    if "does not support" in msg or "Quantize only works on Float Tensor" in msg:
        return "unsupported_dtype"
    if t.numel() == 0 and codec in ("UNIFORM_8BIT", "QUANTILE_8BIT"):
        return "empty"
    if codec == "MEANSTD_16BIT" and t.dim() == 0:
        return "scalar"
    return f"other:{type(err).__name__}"


def streams_for(proto: runtime_pb2.Tensor, blob: Blob) -> list:
    n = len(proto.buffer)
    sizes = [s for s in (1, 5, 4096, DEFAULT_CHUNK, MOE_CHUNK) if n <= s * MAX_PARTS]
    if DEFAULT_CHUNK not in sizes:
        sizes.append(DEFAULT_CHUNK)
    out = []
    for size in sizes:
        parts = list(split_for_streaming(proto, size))
        combined = combine_from_streaming(parts)
        small = sum(p.ByteSize() for p in parts) <= 4096

        def ref(b: bytes) -> dict:
            return blob.add(b, force_inline=True) if small else digest(b)

        out.append(
            {
                "chunk_size": size,
                "parts": [ref(p.SerializeToString()) for p in parts],
                "combined": ref(combined.SerializeToString()),
            }
        )
    return out


def encode_case(name: str, t: torch.Tensor, requires_grad: bool, blob: Blob, codecs=CODECS) -> dict:
    t = t.detach().clone().requires_grad_(requires_grad)
    case = {"name": name, "dtype": dtype_name(t), "shape": list(t.shape), "requires_grad": requires_grad}
    results = {}
    for codec in codecs:
        try:
            proto = serialize_torch_tensor(t, runtime_pb2.CompressionType.Value(codec))
        except Exception as e:  # noqa: BLE001 - hivemind raises ValueError/IndexError/RuntimeError here
            results[codec] = {"encode_error": classify(e, t, codec), "message": str(e)[:200]}
            continue
        decoded = deserialize_torch_tensor(proto)
        results[codec] = {
            "proto": blob.add(proto.SerializeToString(), force_inline=True),
            "decoded": blob.add(raw_bytes(decoded)),
            "decoded_dtype": dtype_name(decoded),
            "decoded_shape": list(decoded.shape),
            "decoded_requires_grad": bool(decoded.requires_grad),
            "streams": streams_for(proto, blob),
        }
    # after the NONE proto, so that the original is found inside it instead of stored twice
    case["original"] = blob.add(raw_bytes(t), force_inline=True)
    case["codecs"] = results
    return case


def values(rng: np.random.RandomState, shape, dtype: torch.dtype) -> torch.Tensor:
    n = int(np.prod(shape)) if len(shape) else 1
    if dtype.is_floating_point:
        x = rng.randn(n).astype(np.float32)
        # rows with their own offset and spread, so MEANSTD's per-row statistics matter
        if len(shape) >= 2 and n:
            rows = n // shape[-1]
            x = x.reshape(rows, shape[-1]) * rng.uniform(0.1, 4, (rows, 1)) + rng.uniform(-3, 3, (rows, 1))
            x = x.astype(np.float32)
        return torch.from_numpy(x.reshape(shape)).to(dtype)
    if dtype == torch.bool:
        return torch.from_numpy(np.asarray(rng.rand(n) < 0.5).reshape(shape))
    lo, hi = {
        torch.int64: (-1000, 1000),
        torch.int32: (-100000, 100000),
        torch.int16: (-30000, 30000),
        torch.int8: (-128, 128),
        torch.uint8: (0, 256),
    }[dtype]
    return torch.from_numpy(rng.randint(lo, hi, n).reshape(shape)).to(dtype)


SPECIAL = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 65504.0, 65520.0, 1e-8, 70000.0,
           -70000.0, 3.4e38, 1e-45, 0.1, -2.5]


def committed_cases(blob: Blob) -> list:
    rng = np.random.RandomState(20240611)
    shapes = {"scalar": (), "empty": (0,), "empty_3x0": (3, 0), "n7": (7,), "3x5x11": (3, 5, 11), "n9000": (9000,)}
    plan = {
        torch.float32: list(shapes),
        torch.float16: list(shapes),
        torch.bfloat16: list(shapes),
        torch.float64: ["scalar", "n7", "3x5x11"],
        torch.int64: ["scalar", "empty", "n7", "3x5x11", "n9000"],
        torch.bool: ["scalar", "n7", "3x5x11", "n9000"],
        torch.int32: ["n7"],
        torch.int16: ["n7"],
        torch.int8: ["3x5x11"],
        torch.uint8: ["3x5x11"],
    }
    cases = []
    for dtype, names in plan.items():
        for name in names:
            t = values(rng, shapes[name], dtype)
            grad = dtype.is_floating_point and name == "3x5x11"
            cases.append(encode_case(f"{dtype_name(t)}_{name}", t, grad, blob))
    big = torch.from_numpy(rng.randn(100_003).astype(np.float32))
    cases.append(encode_case("float32_n100003", big, False, blob))
    special = torch.tensor(SPECIAL, dtype=torch.float32)
    exact = ["NONE", "FLOAT16", "QUANTILE_8BIT", "BLOCKWISE_8BIT"]
    cases.append(encode_case("float32_special", special, False, blob, exact))
    cases.append(encode_case("bfloat16_special", special.to(torch.bfloat16), False, blob, ["NONE", "BLOCKWISE_8BIT"]))
    cases.append(encode_case("float16_special", special.to(torch.float16), False, blob, exact))
    return cases


def versions() -> dict:
    import bitsandbytes

    return {"hivemind": hivemind.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "bitsandbytes": bitsandbytes.__version__}


def write_set(out_dir: Path, cases: list, blob: Blob):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tensors.bin").write_bytes(bytes(blob.data))
    index = {"format": 1, "versions": versions(), "blob": "tensors.bin", "cases": cases}
    (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")


def generate(out_dir: Path):
    """The committed set (crates/wire/tests/golden/tensors): small shapes of every dtype, a 9000-element
    tensor spanning three BLOCKWISE blocks and one of 100003 elements; decoded arrays over 32 KiB are
    kept as digests only."""
    blob = Blob(inline_limit=32 * 1024)
    write_set(out_dir, committed_cases(blob), blob)


def generate_large(out_dir: Path, numel: int, seed: int):
    """A float32 randn tensor of `numel` elements under every codec, everything inline (made at test time)."""
    blob = Blob(inline_limit=None)
    rng = np.random.RandomState(seed)
    t = torch.from_numpy(rng.randn(numel).astype(np.float32))
    write_set(out_dir, [encode_case(f"float32_n{numel}", t, False, blob)], blob)


def decode(in_dir: Path, out_dir: Path):
    """Decodes Apiary-made protos with hivemind. Reads IN_DIR/index.json, `{"items": [{"id", "file"}]}` with each
    file a serialized runtime_pb2.Tensor, and writes OUT_DIR/index.json, `{"items": [{"id", "dtype", "shape",
    "requires_grad", "file"} or {"id", "error"}]}`, with each file the decoded tensor's raw bytes."""
    items = json.loads((in_dir / "index.json").read_text())["items"]
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for item in items:
        proto = runtime_pb2.Tensor.FromString((in_dir / item["file"]).read_bytes())
        try:
            t = deserialize_torch_tensor(proto)
        except Exception as e:  # noqa: BLE001 - reported back to the Rust test
            out.append({"id": item["id"], "error": f"{type(e).__name__}: {e}"})
            continue
        name = f"{item['id']}.out"
        (out_dir / name).write_bytes(raw_bytes(t))
        out.append({"id": item["id"], "dtype": dtype_name(t), "shape": list(t.shape),
                    "requires_grad": bool(t.requires_grad), "file": name})
    (out_dir / "index.json").write_text(json.dumps({"items": out}, indent=1) + "\n")


def cli(argv):
    p = argparse.ArgumentParser(prog="golden.py tensors", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write a large float32 vector set (every codec) to OUT_DIR")
    g.add_argument("out_dir", type=Path)
    g.add_argument("--numel", type=int, default=1_000_000)
    g.add_argument("--seed", type=int, default=1)
    d = sub.add_parser("decode", help="decode Apiary-made protos with hivemind")
    d.add_argument("in_dir", type=Path)
    d.add_argument("out_dir", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "generate":
        generate_large(args.out_dir, args.numel, args.seed)
    else:
        decode(args.in_dir, args.out_dir)
