"""Golden msgpack: hivemind 1.1.12's MSGPackSerializer bytes and DHTIDs, for crates/wire/tests/msgpack_golden.rs.

Every value is described in a small tagged JSON form that the Rust test turns into an apiary `Value`:
  ["nil"] ["bool", b] ["int", "decimal"] ["float", "<16 hex digits of the IEEE bits>", "repr"]
  ["str", s] ["bin", "hex"] ["list", [..]] ["tuple", [..]] ["dict", [[k, v], ..]]
  ["dhtdict", maxsize, latest_expiration_time, [[subkey, "value hex", expiration], ..]]
  ["descr", <the dict BatchTensorDescriptor.packb() writes>] ["ext", code, "hex"]
and, to keep the file small, ["str_rep", unit, count] ["bin_rep", "hex unit", count] ["list_rep", item, count].
Bytes longer than 4 KiB are stored as {"len", "sha256"} instead of "hex".

Output msgpack.json:
  values       hivemind's dumps(obj): "hex", "value" = describe(loads(hex)), "canonical" = dumps(loads(hex));
               Apiary must decode hex to value and encode value to canonical (= hex for these)
  decode_only  hand-made bytes hivemind's loads accepts (non-minimal widths, float32, odd tuple payloads, …)
  encode_only  values hivemind dumps but its own loads rejects (non-str map keys: strict_map_key=True)
  errors       bytes hivemind's loads rejects, with the Python exception
  dhtids       DHTID.generate(key) for many keys; xor distances and common prefix lengths
  rpc_info     ExpertInfo.serialized_info of real ModuleBackends (Appendix B and Server.create-style experts)

Command line (golden.py msgpack ...):
  loads FILE   FILE = {"cases": [{"name", "hex"}]}; prints {"results": [{"name", "value"|"error", "canonical"}]}
               where hivemind decodes Apiary's bytes and re-encodes them
"""
import hashlib
import json
import logging
import math
import struct
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import msgpack  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from hivemind.dht.routing import DHTID  # noqa: E402
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue  # noqa: E402
from hivemind.moe.expert_uid import FLAT_EXPERT, UID_DELIMITER, split_uid  # noqa: E402
from hivemind.moe.server.layers import name_to_block, name_to_input  # noqa: E402
from hivemind.moe.server.module_backend import ModuleBackend  # noqa: E402
from hivemind.proto.runtime_pb2 import CompressionType  # noqa: E402
from hivemind.utils.serializer import MSGPackSerializer as S  # noqa: E402
from hivemind.utils.tensor_descr import DUMMY_BATCH_SIZE, BatchTensorDescriptor  # noqa: E402

logging.getLogger("hivemind").setLevel(logging.ERROR)
for _name in list(logging.root.manager.loggerDict):
    if _name.startswith("hivemind"):
        logging.getLogger(_name).setLevel(logging.ERROR)

BIG = 4096
FAR = 4102444800.5  # 2100-01-01: DHT storage rejects already-expired values
PEER = "QmVdQr3TQMkxRxhA9tHjEcHj6KB3wNe6RKdZR9GFtbvW7T"


# ------------------------------------------------------------------------------------------------
# description


def describe(obj):
    if obj is None:
        return ["nil"]
    if isinstance(obj, bool):
        return ["bool", obj]
    if isinstance(obj, int):
        return ["int", str(obj)]
    if isinstance(obj, float):
        return ["float", struct.pack(">d", obj).hex(), repr(obj)]
    if isinstance(obj, str):
        if len(obj) > 256 and obj == obj[0] * len(obj):
            return ["str_rep", obj[0], len(obj)]
        return ["str", obj]
    if isinstance(obj, bytes):
        if len(obj) > 256 and obj == obj[:1] * len(obj):
            return ["bin_rep", obj[:1].hex(), len(obj)]
        return ["bin", obj.hex()]
    if isinstance(obj, (list, tuple)):
        items = [describe(x) for x in obj]
        tag = "list" if isinstance(obj, list) else "tuple"
        if len(items) > 256 and all(i == items[0] for i in items):
            if tag == "list":
                return ["list_rep", items[0], len(items)]
        return [tag, items]
    if isinstance(obj, dict):
        return ["dict", [[describe(k), describe(v)] for k, v in obj.items()]]
    if isinstance(obj, DictionaryDHTValue):
        with obj.freeze():
            items = [[describe(k), v.hex(), describe(e)] for k, (v, e) in obj.items()]
        return ["dhtdict", describe(obj.maxsize), describe(obj.latest_expiration_time), items]
    if isinstance(obj, BatchTensorDescriptor):
        return ["descr", describe(S.loads(obj.packb()))]
    if isinstance(obj, msgpack.ExtType):
        return ["ext", obj.code, obj.data.hex()]
    if isinstance(obj, msgpack.Timestamp):
        return ["ext", -1, obj.to_bytes().hex()]
    raise TypeError(f"cannot describe {type(obj)}")


def put_bytes(case, key, data):
    """hex for small byte strings, length + sha256 for big ones"""
    if len(data) > BIG:
        case[key] = {"len": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    else:
        case[key] = data.hex()


def case_from_bytes(name, data, note=None):
    obj = S.loads(data)
    case = {"name": name}
    put_bytes(case, "hex", data)
    case["value"] = describe(obj)
    put_bytes(case, "canonical", S.dumps(obj))
    if note:
        case["note"] = note
    return case


# ------------------------------------------------------------------------------------------------
# values


def int_boundaries():
    pos = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
    neg = [-1, -31, -32, -33, -127, -128, -129, -32767, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63) + 1, -(2**63)]
    return pos + neg


def floats():
    return [0.0, -0.0, 1.0, 1.5, -2.25, math.pi, 1e300, -1e-300, 5e-324, 2.0**53 + 2, float("inf"), float("-inf"),
            float("nan"), 1795759842.50162, FAR]


def value_cases():
    yield "nil", None
    yield "true", True
    yield "false", False
    for i in int_boundaries():
        yield f"int_{i}", i
    for f in floats():
        yield f"float_{f!r}", f
    for n in [0, 1, 31, 32, 255, 256, 65535, 65536]:
        yield f"str_len_{n}", "x" * n
    yield "str_unicode", "héllo ✓ 🐝 \x00 end"
    yield "str_uid", "ffn.0.5"
    for n in [0, 1, 255, 256, 65535, 65536]:
        yield f"bin_len_{n}", b"\xab" * n
    yield "bin_all_bytes", bytes(range(256))
    for n in [0, 1, 15, 16, 65535, 65536]:
        yield f"list_len_{n}", [0] * n
    yield "list_mixed", [1, -1, 1.5, "s", b"b", None, True, [], (), {}]
    for n in [0, 1, 2, 15, 16, 300]:
        yield f"tuple_len_{n}", tuple(range(n))
    yield "tuple_nested", ((1, [2, (3,)]), {"a": (4,)}, ((),))
    for n in [0, 1, 15, 16, 300]:
        yield f"dict_len_{n}", {f"k{i}": i for i in range(n)}
    yield "dict_bytes_keys", {b"raw": 1, "str": 2, b"": None}
    yield "dict_nested", {"forward": [1, (2.5, None), b"x", {"k": True}], "z": {"y": {"x": ()}}}
    # MoE declarations (moe/server/dht_handler.py): uid -> peer, prefix[coord] -> (uid, peer)
    yield "declaration_uid_value", PEER
    yield "declaration_prefix_value", ("ffn.0.5", PEER)
    yield "declaration_doc_example", ("ffn.0.5", "QmPeer")
    yield "negative_cache_value", None
    # BatchTensorDescriptor (ext 0x51)
    yield "descr_plain", BatchTensorDescriptor(4)
    yield "descr_scalar", BatchTensorDescriptor()
    yield "descr_full", BatchTensorDescriptor(
        3, 5, dtype=torch.float16, requires_grad=True, compression=CompressionType.FLOAT16, device=torch.device("cpu")
    )
    yield "descr_cuda", BatchTensorDescriptor(128, 16, dtype=torch.bfloat16, device=torch.device("cuda", 1),
                                              pin_memory=True)
    yield "descr_from_tensor", BatchTensorDescriptor.from_tensor(torch.zeros(3, 7, dtype=torch.int64))
    yield "descr_bool_uint8", (BatchTensorDescriptor(2, dtype=torch.bool), BatchTensorDescriptor(2, dtype=torch.uint8))
    yield "descr_sparse", BatchTensorDescriptor(4, layout=torch.sparse_coo, dtype=torch.float64)
    # DictionaryDHTValue (ext 0x50)
    yield "dhtdict_empty", DictionaryDHTValue()
    for key, value in declared_dictionaries():
        yield f"dhtdict_declared_{key}", value
    d = DictionaryDHTValue()
    d.store(b"[owner:fake]", S.dumps({"epoch": 3}), FAR + 7)
    d.store("string-subkey", S.dumps([1, 2]), FAR + 1)
    yield "dhtdict_mixed_subkeys", d


def declared_dictionaries():
    """DictionaryDHTValues exactly as a DHT node's storage holds them after hivemind experts declared themselves
    (moe/server/dht_handler.py::_declare_experts + DHTProtocol.rpc_store), serialized as rpc_find does."""
    uids = ["ffn.0.5", "ffn.0.7", "ffn.3.1", "expert.1.2.3", "expert.1.4.0", "flat.9"]
    data = {}
    for uid in uids:
        data[uid, None] = PEER
        prefix = uid if uid.count(UID_DELIMITER) > 1 else f"{uid}{UID_DELIMITER}{FLAT_EXPERT}"
        for _ in range(prefix.count(UID_DELIMITER) - 1):
            prefix, last_coord = split_uid(prefix)
            data[prefix, last_coord] = (uid, PEER)
    storage = DHTLocalStorage()
    for i, ((key, subkey), value) in enumerate(data.items()):
        key_id = DHTID.generate(source=key)
        value_bytes = S.dumps(value)
        expiration = FAR + 0.25 * i
        if subkey is None:
            assert storage.store(key_id, value_bytes, expiration)
        else:  # the sub-key travels as msgpack in StoreRequest.subkeys and rpc_store loads it back
            assert storage.store(key_id, value_bytes, expiration, subkey=S.loads(S.dumps(subkey)))
    # a beam-search negative cache entry (moe/client/beam_search.py): prefix[-1] = None
    assert storage.store(DHTID.generate(source="ffn.9."), S.dumps(None), FAR, subkey=-1)
    for key in ["ffn.0.", "ffn.3.", "expert.1.2.", "expert.1.4.", "expert.1.", "flat.9.", "ffn.9."]:
        item = storage.get(DHTID.generate(source=key))
        assert isinstance(item.value, DictionaryDHTValue), key
        yield key, item.value


# ------------------------------------------------------------------------------------------------
# hand-made bytes


def ext(code, payload):
    return msgpack.packb(msgpack.ExtType(code, payload))


def raw_descr(**fields):
    return ext(0x51, msgpack.packb(fields, use_bin_type=True, default=S._encode_ext_types, strict_types=True))


def raw_dict(payload_obj):
    return ext(0x50, msgpack.packb(payload_obj, use_bin_type=True, default=S._encode_ext_types, strict_types=True))


def decode_only_cases():
    yield "uint16_for_1", bytes.fromhex("cd0001")
    yield "uint64_for_0", bytes.fromhex("cf0000000000000000")
    yield "int8_for_0", bytes.fromhex("d000")
    yield "int8_positive", bytes.fromhex("d07f")
    yield "int64_minus_1", bytes.fromhex("d3ffffffffffffffff")
    yield "int32_positive", bytes.fromhex("d200010000")
    yield "float32", bytes.fromhex("ca3fc00000")
    yield "float32_nan", bytes.fromhex("ca7fc00000")
    yield "float32_inf", bytes.fromhex("caff800000")
    yield "str8_short", bytes.fromhex("d90161")
    yield "str16_short", bytes.fromhex("da000161")
    yield "str32_short", bytes.fromhex("db0000000161")
    yield "bin16_short", bytes.fromhex("c50001ff")
    yield "bin32_short", bytes.fromhex("c600000001ff")
    yield "array16_short", bytes.fromhex("dc000101")
    yield "array32_short", bytes.fromhex("dd0000000101")
    yield "map16_short", bytes.fromhex("de0001a16101")
    yield "map32_short", bytes.fromhex("df00000001a16101")
    yield "ext8_tuple_empty", bytes.fromhex("c7014090")
    yield "ext16_tuple", bytes.fromhex("c800024091c0")
    yield "tuple_of_str", bytes.fromhex("d540a161")
    yield "tuple_of_str_unicode", ext(0x40, msgpack.packb("hé🐝"))
    yield "tuple_of_bin", bytes.fromhex("c70440c4020102")
    yield "tuple_of_map", bytes.fromhex("c7044081a16101")
    yield "tuple_of_tuple", ext(0x40, bytes.fromhex("d5409101"))
    yield "tuple_of_unknown_ext", ext(0x40, bytes.fromhex("d40761"))
    yield "dict_duplicate_keys", bytes.fromhex("83a16101a16202a16103")
    yield "dict_bin_key", bytes.fromhex("81c4016101")
    yield "dict_str_and_bin_same_bytes", bytes.fromhex("82a16101c4016102")
    yield "timestamp32", bytes.fromhex("d6ff00000001")
    yield "descr_alias_and_batch_dim", raw_descr(
        size=(7, 2), dtype="float", layout="strided", device_type="cuda", device_index=1
    )
    yield "descr_list_size_defaults", raw_descr(
        size=[None, 3], dtype="torch.double", layout=None, device_type=None, device_index=5
    )
    yield "descr_ignored_device_field", raw_descr(
        size=(None, 2), dtype="int64", layout="torch.strided", device_type=None, device_index=None, device="cuda"
    )
    yield "descr_device_index", raw_descr(
        size=(None,), dtype=None, layout="torch.strided", device_type="cuda", device_index=3, requires_grad=True
    )
    # expirations lie in the future: packb (through TimedStorage.items) drops entries that expired
    yield "dhtdict_falsy_maxsize_and_merges", raw_dict(
        [None, FAR + 5, [[1, b"a", FAR + 3], [1.0, b"b", FAR + 4], [2, b"c", FAR + 1], [True, b"d", FAR + 2]]]
    )
    yield "dhtdict_int_times", raw_dict([float("inf"), 2**32 + 10, [[5, b"x", 2**32 + 10], ("t", b"y", 2**32 + 7)]])
    yield "dhtdict_tuple_payload", raw_dict((0, -1.5, ((("k",), b"", FAR),)))


def encode_only_cases():
    yield "dict_int_keys", {1: 2, -5: "x"}
    yield "dict_tuple_key", {(1, "a"): None}
    yield "dict_mixed_keys", {None: 1, 1.5: 2, True: 3}


def error_cases():
    yield "empty", b""
    yield "reserved_c1", bytes.fromhex("c1")
    yield "invalid_utf8", bytes.fromhex("a1ff")
    yield "utf8_surrogate", bytes.fromhex("a3eda080")
    yield "trailing_bytes", bytes.fromhex("0101")
    yield "truncated_array", bytes.fromhex("9201")
    yield "truncated_str", bytes.fromhex("a36162")
    yield "truncated_float", bytes.fromhex("cb3ff0")
    yield "truncated_array32_header", bytes.fromhex("ddffffffff")
    yield "tuple_of_int", bytes.fromhex("d44001")
    yield "tuple_of_nil", bytes.fromhex("d440c0")
    yield "tuple_payload_trailing", bytes.fromhex("d5409001")
    yield "tuple_payload_empty", bytes.fromhex("c70040")
    yield "tuple_payload_truncated", bytes.fromhex("d440a1")
    yield "tuple_of_timestamp", ext(0x40, bytes.fromhex("d6ff00000001"))
    yield "map_int_key", bytes.fromhex("810102")
    yield "map_nil_key", bytes.fromhex("81c001")
    yield "map_bool_key", bytes.fromhex("81c301")
    yield "map_float_key", bytes.fromhex("81cb000000000000000001")
    yield "map_list_key", bytes.fromhex("819001")
    yield "map_tuple_key", bytes.fromhex("81d4409001")
    yield "timestamp_bad_length", bytes.fromhex("d5ff0001")
    yield "nested_1025_arrays", b"\x91" * 1025 + b"\x00"
    yield "descr_missing_dtype", raw_descr(size=(None, 4), layout="torch.strided", device_type=None, device_index=None)
    yield "descr_unknown_field", raw_descr(
        size=(None, 4), dtype=None, layout="torch.strided", device_type=None, device_index=None, colour="red"
    )
    yield "descr_dtype_not_str", raw_descr(size=(None, 4), dtype=5, layout=None, device_type=None, device_index=None)
    yield "descr_device_with_index", raw_descr(
        size=(None,), dtype=None, layout=None, device_type="cuda:1", device_index=None
    )
    yield "descr_not_a_dict", ext(0x51, msgpack.packb([1, 2]))
    yield "descr_bad_payload", ext(0x51, b"\xc1")
    yield "dhtdict_two_parts", raw_dict([float("inf"), 1.0])
    yield "dhtdict_item_two_parts", raw_dict([float("inf"), 1.0, [[1, b"x"]]])
    yield "dhtdict_unhashable_subkey", raw_dict([float("inf"), 1.0, [[[1], b"x", 1.0]]])
    yield "dhtdict_bad_payload", ext(0x50, b"\x93\x00")


# ------------------------------------------------------------------------------------------------
# DHTIDs


def dhtid_keys():
    yield "ffn.0.5"
    yield "ffn.0."
    yield ""
    yield "x" * 40
    yield "héllo 🐝"
    yield "run_progress"
    yield "myrun_grad_averager.0b0101"
    for i in [0, 1, -1, 127, 128, 2**64 - 1, -(2**63)]:
        yield i
    yield 1.5
    # (None is not a key: DHTID.generate(None) draws a random id)
    yield True
    yield ("ffn", 5)
    yield ["ffn", 5]
    yield {"a": 1}
    yield b"raw bytes are hashed as they are"
    yield b""
    yield bytes(range(20))


def dhtids():
    out = []
    for key in dhtid_keys():
        out.append({"key": describe(key), "id": DHTID.generate(source=key).to_bytes().hex()})
    ids = [DHTID.generate(source=k) for k in ["a", "b", "ffn.0.5", "ffn.0.6"]] + [DHTID(0), DHTID(DHTID.MAX - 1)]
    pairs = []
    for a in ids:
        for b in ids:
            pairs.append(
                {
                    "a": a.to_bytes().hex(),
                    "b": b.to_bytes().hex(),
                    "xor": DHTID(a.xor_distance(b)).to_bytes().hex(),
                    "common_prefix": DHTID.longest_common_prefix_length(a, b),
                    "a_lt_b": a < b,
                }
            )
    return out, pairs


# ------------------------------------------------------------------------------------------------
# rpc_info


class TwoHeads(nn.Module):
    """keyword inputs and tuple outputs"""

    def __init__(self, hid):
        super().__init__()
        self.proj = nn.Linear(hid, hid)

    def forward(self, x, *, scale):
        return self.proj(x) * scale, x.sum(-1, keepdim=True)


def rpc_infos():
    torch.manual_seed(0)
    yield "appendix_b_ffn", ModuleBackend(
        "ffn.0.5", name_to_block["ffn"](4), args_schema=(BatchTensorDescriptor(4),), max_batch_size=16
    )
    for cls, hid in [("ffn", 1024), ("transformer", 16), ("det_dropout", 8), ("nop", 4)]:
        sample = name_to_input[cls](DUMMY_BATCH_SIZE, hid)
        if isinstance(sample, tuple):
            args = tuple(BatchTensorDescriptor.from_tensor(a, CompressionType.NONE) for a in sample)
        else:
            args = (BatchTensorDescriptor.from_tensor(sample, CompressionType.FLOAT16),)
        yield f"server_create_{cls}", ModuleBackend(
            f"{cls}.0.1", name_to_block[cls](hid), args_schema=args, max_batch_size=4096
        )
    yield "kwargs_tuple_outputs", ModuleBackend(
        "two.0.0",
        TwoHeads(4),
        args_schema=(BatchTensorDescriptor(4),),
        kwargs_schema={"scale": BatchTensorDescriptor(1)},
        max_batch_size=16,
    )


# ------------------------------------------------------------------------------------------------


def dump_one_per_line(doc) -> str:
    """JSON with one case per line: small and diff-friendly"""
    parts = []
    for k, v in doc.items():
        if isinstance(v, list):
            inner = ",\n  ".join(json.dumps(x, ensure_ascii=False) for x in v)
            parts.append(f" {json.dumps(k)}: [\n  {inner}\n ]")
        else:
            parts.append(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def generate(out_dir: Path):
    values = [case_from_bytes(name, S.dumps(obj)) for name, obj in value_cases()]
    for case in values:
        assert case["hex"] == case["canonical"], case["name"]
    unknown = ext(7, b"abc")
    values.append(
        {
            "name": "unknown_ext",
            "hex": unknown.hex(),
            "value": ["ext", 7, "616263"],
            "canonical": unknown.hex(),
            "note": "hivemind's loads turns unknown exts into bytes (" + json.dumps(describe(S.loads(unknown))) + "); "
            "Apiary keeps them as Ext",
        }
    )
    decode_only = [case_from_bytes(name, data) for name, data in decode_only_cases()]
    for case in decode_only:  # no entry may have expired (Apiary's encoder has no clock)
        if case["value"][0] == "dhtdict":
            again = case_from_bytes("again", bytes.fromhex(case["canonical"]))
            assert again["value"] == case["value"], case["name"]
    encode_only = []
    for name, obj in encode_only_cases():
        data = S.dumps(obj)
        try:
            S.loads(data)
            raise AssertionError(f"{name}: hivemind loads it")
        except ValueError as e:
            encode_only.append({"name": name, "hex": data.hex(), "value": describe(obj), "loads_error": str(e)})
    errors = []
    for name, data in error_cases():
        try:
            S.loads(data)
        except Exception as e:  # noqa: BLE001 - any exception is a rejection
            case = {"name": name, "error": f"{type(e).__name__}: {e}"}
            put_bytes(case, "hex", data)
            errors.append(case)
        else:
            raise AssertionError(f"{name}: hivemind accepts it")
    ids, pairs = dhtids()
    infos = []
    for name, backend in rpc_infos():
        data = S.dumps(backend.get_info())
        infos.append(case_from_bytes(name, data))
    doc = {
        "generator": "tests/interop/golden_msgpack.py",
        "hivemind": __import__("hivemind").__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "torch": torch.__version__,
        "values": values,
        "decode_only": decode_only,
        "encode_only": encode_only,
        "errors": errors,
        "dhtids": ids,
        "dhtid_pairs": pairs,
        "rpc_info": infos,
    }
    (out_dir / "msgpack.json").write_text(dump_one_per_line(doc))


def cli(argv):
    if len(argv) == 2 and argv[0] == "loads":
        cases = json.loads(Path(argv[1]).read_text())["cases"]
        results = []
        for case in cases:
            out = {"name": case["name"]}
            try:
                obj = S.loads(bytes.fromhex(case["hex"]))
                out["value"] = describe(obj)
                out["canonical"] = S.dumps(obj).hex()
            except Exception as e:  # noqa: BLE001
                out["error"] = f"{type(e).__name__}: {e}"
            results.append(out)
        print(json.dumps({"results": results}))
        return
    print("usage: golden.py msgpack loads FILE", file=sys.stderr)
    sys.exit(2)
