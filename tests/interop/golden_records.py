"""Golden DHT record signatures: hivemind 1.1.12's RSASignatureValidator (dht/crypto.py) at work, for
crates/wire/tests/records_golden.rs.

The keys are throwaway test fixtures, made once and committed next to the vectors (test_key.der, other_key.der:
PKCS#1 DER, what RSAPrivateKey.to_bytes() writes); generate() reuses them when present. RSA-PSS salts are
random, so signatures change on every run; the verdicts do not.

Output records.json:
  keys      for each key file: hivemind's public key (OpenSSH) and owner marker, the PKCS#8 DER of the same key,
            and the libp2p identity protobuf P2P.generate_identity would write for it
  records   {name, key, subkey, value (hex), expiration_time, expiration_bits, verdict (valid|invalid|error),
            error, stripped (strip_value), signed_message (_serialize_record of the stripped record)}
            valid = validate() returned True, invalid = False, error = validate() raised

Command line (golden.py records ...):
  verify FILE   FILE = {"records": [{"name", "key", "subkey", "value", "expiration_bits"}]}; prints
                {"results": [{"name", "verdict", "error", "stripped"}]} as hivemind's validator sees them
"""
import base64
import dataclasses
import json
import logging
import math
import struct
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519, padding  # noqa: E402

from hivemind.dht.crypto import RSASignatureValidator  # noqa: E402
from hivemind.dht.routing import DHTID  # noqa: E402
from hivemind.dht.validation import DHTRecord  # noqa: E402
from hivemind.proto import crypto_pb2  # noqa: E402
from hivemind.utils.crypto import RSAPrivateKey  # noqa: E402
from hivemind.utils.serializer import MSGPackSerializer as S  # noqa: E402

logging.getLogger("hivemind").setLevel(logging.ERROR)

EXP = 4102444800.75  # 2100-01-01


def load_or_make_key(path: Path) -> RSAPrivateKey:
    if not path.exists():
        path.write_bytes(RSAPrivateKey().to_bytes())
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": path.read_bytes()})
    return key


def exp_bits(x: float) -> str:
    return struct.pack(">d", x).hex()


def verdict(record):
    try:
        ok = RSASignatureValidator(private_key=_ANY_KEY[0]).validate(record)
    except Exception as e:  # noqa: BLE001 - hivemind raising is the verdict
        return "error", f"{type(e).__name__}: {e}"
    return ("valid" if ok else "invalid"), ""


_ANY_KEY = []


def describe_record(name, record, validator):
    v, err = verdict(record)
    stripped = validator.strip_value(record)
    message = validator._serialize_record(dataclasses.replace(record, value=stripped))
    return {
        "name": name,
        "key": record.key.hex(),
        "subkey": record.subkey.hex(),
        "value": record.value.hex(),
        "expiration_time": record.expiration_time if math.isfinite(record.expiration_time) else repr(record.expiration_time),
        "expiration_bits": exp_bits(record.expiration_time),
        "verdict": v,
        "error": err,
        "stripped": stripped.hex(),
        "signed_message": message.hex(),
    }


def sign_manually(key: RSAPrivateKey, record: DHTRecord, salt_length=padding.PSS.MAX_LENGTH) -> bytes:
    """a [signature:…] for `record` whatever its owner, with a chosen PSS salt length"""
    message = S.dumps(dataclasses.astuple(record))
    raw = key._private_key.sign(
        message, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt_length), hashes.SHA256()
    )
    return b"[signature:" + base64.b64encode(raw) + b"]"


def cases(test: RSASignatureValidator, other: RSASignatureValidator, test_key: RSAPrivateKey):
    marker = test.local_public_key
    other_marker = other.local_public_key
    key = DHTID.generate(source="run_progress").to_bytes()
    subkey = S.dumps(marker)
    value = S.dumps({"peer_id": b"\x00\x24\x08\x01", "epoch": 3, "samples_accumulated": 1234, "time": 1.5e9})

    def signed(record, validator=test):
        return dataclasses.replace(record, value=validator.sign_value(record))

    base = DHTRecord(key, subkey, value, EXP)
    good = signed(base)
    yield "signed_owner_subkey", good
    yield "signed_owner_in_key", signed(DHTRecord(b"prefix" + marker + b"suffix", S.dumps(None), value, EXP))
    yield "signed_empty_value", signed(DHTRecord(key, subkey, b"", EXP))
    yield "signed_infinite_expiration", signed(DHTRecord(key, subkey, value, float("inf")))
    yield "signed_by_other_own_subkey", signed(DHTRecord(key, S.dumps(other_marker), value, EXP), other)
    yield "signed_same_owner_twice", signed(DHTRecord(key, S.dumps([marker, marker]), value, EXP))
    yield "signed_same_owner_key_and_subkey", signed(DHTRecord(b"k" + marker, subkey, value, EXP))
    commented = b"[owner:" + marker[len(b"[owner:"):-1] + b" a comment]"
    rec = DHTRecord(key, S.dumps(commented), value, EXP)
    yield "owner_key_with_comment", dataclasses.replace(rec, value=rec.value + sign_manually(test_key, rec))
    # the signature may sit anywhere in the value: it is stripped before verification
    half = len(value) // 2
    sig = sign_manually(test_key, base)
    yield "signature_in_the_middle", dataclasses.replace(base, value=value[:half] + sig + value[half:])
    b64 = sig[len(b"[signature:"):-1]
    junk = b64[:10] + b"!*\x80 " + b64[10:100] + b"~" + b64[100:]
    yield "signature_with_junk_characters", dataclasses.replace(base, value=value + b"[signature:" + junk + b"]")
    yield "signature_without_padding", dataclasses.replace(
        base, value=value + b"[signature:" + b64.rstrip(b"=") + b"]"
    )
    yield "signature_extra_padding_and_tail", dataclasses.replace(
        base, value=value + b"[signature:" + b64 + b"==tail]"
    )
    # unprotected records are always valid
    yield "unprotected_plain", DHTRecord(key, S.dumps(5), S.dumps(("ffn.0.5", "QmPeer")), EXP)
    yield "unprotected_regular", DHTRecord(key, S.dumps(None), S.dumps("QmPeer"), EXP)
    yield "unprotected_with_bogus_signature", DHTRecord(key, S.dumps(5), value + b"[signature:bogus]", EXP)
    yield "unprotected_two_signatures", DHTRecord(key, S.dumps(5), value + b"[signature:a][signature:b]", EXP)
    newline_marker = b"[owner:ssh-rsa\nAAAA]"
    yield "owner_marker_broken_by_newline", DHTRecord(key, S.dumps(newline_marker), value, EXP)
    yield "owner_marker_empty", DHTRecord(key, S.dumps(b"[owner:]"), value, EXP)
    # protected and invalid
    yield "tampered_value", dataclasses.replace(good, value=S.dumps({"epoch": 4}) + good.value[len(value):])
    yield "tampered_expiration", dataclasses.replace(good, expiration_time=EXP + 1)
    yield "tampered_key", dataclasses.replace(good, key=DHTID.generate(source="other").to_bytes())
    yield "missing_signature", base
    yield "two_signatures", dataclasses.replace(good, value=good.value + sig)
    yield "empty_signature", dataclasses.replace(base, value=value + b"[signature:]")
    yield "bad_base64_signature", dataclasses.replace(base, value=value + b"[signature:!!!!]")
    yield "truncated_base64_signature", dataclasses.replace(base, value=value + b"[signature:" + b64[:-8] + b"]")
    wrong = DHTRecord(key, S.dumps(other_marker), value, EXP)
    yield "wrong_owner", dataclasses.replace(wrong, value=value + sign_manually(test_key, wrong))
    both = DHTRecord(b"k" + other_marker, subkey, value, EXP)
    yield "different_owners_key_and_subkey", dataclasses.replace(both, value=value + sign_manually(test_key, both))
    yield "digest_length_salt", dataclasses.replace(base, value=value + sign_manually(test_key, base, 32))
    yield "zero_length_salt", dataclasses.replace(base, value=value + sign_manually(test_key, base, 0))
    # owner keys hivemind cannot parse: validate() raises
    for name, bad in [
        ("malformed_owner_key", b"[owner:ssh-rsa AAAAnotakey]"),
        ("owner_key_type_mismatch", b"[owner:ssh-dss " + marker[len(b"[owner:ssh-rsa "):-1] + b"]"),
        ("owner_key_no_body", b"[owner:ssh-rsa]"),
        ("owner_key_trailing_blob", b"[owner:ssh-rsa " + base64.b64encode(
            base64.b64decode(marker[len(b"[owner:ssh-rsa "):-1]) + b"\x00") + b"]"),
        ("owner_key_even_exponent", b"[owner:ssh-rsa " + base64.b64encode(
            b"\x00\x00\x00\x07ssh-rsa" + b"\x00\x00\x00\x01\x04" + b"\x00\x00\x00\x02\x00\xc3") + b"]"),
    ]:
        rec = DHTRecord(key, S.dumps(bad), value, EXP)
        yield name, dataclasses.replace(rec, value=value + sign_manually(test_key, rec))
    ed = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    rec = DHTRecord(key, S.dumps(b"[owner:" + ed + b"]"), value, EXP)
    yield "owner_key_ed25519", dataclasses.replace(rec, value=value + sign_manually(test_key, rec))


def key_info(key: RSAPrivateKey, file_name: str):
    pub = key.get_public_key().to_bytes()
    return {
        "file": file_name,
        "public_key_openssh": pub.decode(),
        "owner_marker": RSASignatureValidator(private_key=key).local_public_key.hex(),
        "pkcs8_der": key._private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).hex(),
        "libp2p_identity": crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes())
        .SerializeToString()
        .hex(),
    }


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
    test_key = load_or_make_key(out_dir / "test_key.der")
    other_key = load_or_make_key(out_dir / "other_key.der")
    _ANY_KEY[:] = [test_key]
    test = RSASignatureValidator(private_key=test_key)
    other = RSASignatureValidator(private_key=other_key)
    records = [describe_record(name, rec, test) for name, rec in cases(test, other, test_key)]
    expected = {
        "signed_owner_subkey": "valid",
        "unprotected_plain": "valid",
        "tampered_value": "invalid",
        "missing_signature": "invalid",
        "wrong_owner": "invalid",
        "malformed_owner_key": "error",
    }
    for r in records:
        if r["name"] in expected:
            assert r["verdict"] == expected[r["name"]], r
    doc = {
        "generator": "tests/interop/golden_records.py",
        "hivemind": __import__("hivemind").__version__,
        "keys": {"test": key_info(test_key, "test_key.der"), "other": key_info(other_key, "other_key.der")},
        "records": records,
    }
    (out_dir / "records.json").write_text(dump_one_per_line(doc))


def cli(argv):
    if len(argv) == 2 and argv[0] == "verify":
        _ANY_KEY[:] = [RSAPrivateKey()]
        validator = RSASignatureValidator(private_key=_ANY_KEY[0])
        results = []
        for r in json.loads(Path(argv[1]).read_text())["records"]:
            exp = struct.unpack(">d", bytes.fromhex(r["expiration_bits"]))[0]
            record = DHTRecord(bytes.fromhex(r["key"]), bytes.fromhex(r["subkey"]), bytes.fromhex(r["value"]), exp)
            v, err = verdict(record)
            results.append({"name": r["name"], "verdict": v, "error": err, "stripped": validator.strip_value(record).hex()})
        print(json.dumps({"results": results}))
        return
    print("usage: golden.py records verify FILE", file=sys.stderr)
    sys.exit(2)
