"""Golden protobuf bytes: one or more cases of every message hivemind puts on the wire, serialized by
hivemind 1.1.12's own generated `*_pb2` modules (python protobuf).

Values are deterministic: byte strings come from pat(seed, n) = [(seed + 37 * i) % 256 for i in range(n)],
which the Rust test rebuilds the same way, so each case is built on both sides and compared both ways.

Output: messages.json = {"cases": [{"name", "message", "hex"}]}.
"""
import argparse
import json
import sys
from pathlib import Path

from hivemind.proto import auth_pb2, averaging_pb2, crypto_pb2, dht_pb2, p2pd_pb2, runtime_pb2, test_pb2


def pat(seed, n):
    return bytes((seed + 37 * i) % 256 for i in range(n))


def tensor(seed, n, **kw):
    return runtime_pb2.Tensor(buffer=pat(seed, n), **kw)


def request_auth():
    return auth_pb2.RequestAuthInfo(
        client_access_token=access_token(),
        service_public_key=pat(5, 40),
        time=1795759842.50162,
        nonce=pat(6, 8),
        signature=pat(7, 256),
    )


def response_auth():
    return auth_pb2.ResponseAuthInfo(service_access_token=access_token(), nonce=pat(6, 8), signature=pat(8, 256))


def access_token():
    return auth_pb2.AccessToken(
        username="volunteer", public_key=pat(3, 300), expiration_time="2026-11-28 12:00:00", signature=pat(4, 256)
    )


def node(seed=1):
    return dht_pb2.NodeInfo(node_id=pat(seed, 20))


def cases():
    R = dht_pb2.ResultType
    M = averaging_pb2.MessageCode
    C = runtime_pb2.CompressionType
    yield "node_info_empty", "dht.NodeInfo", dht_pb2.NodeInfo()
    yield "node_info", "dht.NodeInfo", node()
    yield "ping_request", "dht.PingRequest", dht_pb2.PingRequest(peer=node(), validate=True)
    yield "ping_request_auth", "dht.PingRequest", dht_pb2.PingRequest(auth=request_auth(), peer=node())
    yield "ping_response", "dht.PingResponse", dht_pb2.PingResponse(
        peer=node(2), dht_time=1795759842.50162, available=True
    )
    yield "ping_response_auth", "dht.PingResponse", dht_pb2.PingResponse(
        auth=response_auth(), peer=node(2), dht_time=1.5
    )
    yield "store_request", "dht.StoreRequest", dht_pb2.StoreRequest(
        keys=[pat(10, 20), pat(11, 20), pat(12, 20)],
        subkeys=[b"\xc0", b"\x05", b""],
        values=[pat(13, 7), pat(14, 300), b""],
        expiration_time=[1795759842.5, 1795759900.25, 0.0],
        in_cache=[False, True, False],
        peer=node(),
    )
    yield "store_response", "dht.StoreResponse", dht_pb2.StoreResponse(store_ok=[True, False, True], peer=node(2))
    yield "find_request", "dht.FindRequest", dht_pb2.FindRequest(keys=[pat(20, 20), pat(21, 20)], peer=node())
    yield "find_request_client_mode", "dht.FindRequest", dht_pb2.FindRequest(
        keys=[pat(20, 20)], peer=dht_pb2.NodeInfo()
    )
    yield "find_response", "dht.FindResponse", dht_pb2.FindResponse(
        results=[
            dht_pb2.FindResult(
                type=R.NOT_FOUND, nearest_node_ids=[pat(30, 20), pat(31, 20)], nearest_peer_ids=[pat(32, 34), pat(33, 38)]
            ),
            dht_pb2.FindResult(type=R.FOUND_REGULAR, value=pat(34, 9), expiration_time=1795759842.50162),
            dht_pb2.FindResult(
                type=R.FOUND_DICTIONARY, value=pat(35, 60), expiration_time=1795759999.0, nearest_node_ids=[pat(36, 20)],
                nearest_peer_ids=[pat(37, 34)],
            ),
        ],
        peer=node(2),
    )
    yield "expert_uid", "runtime.ExpertUID", runtime_pb2.ExpertUID(uid="ffn.0.5")
    yield "expert_info", "runtime.ExpertInfo", runtime_pb2.ExpertInfo(serialized_info=pat(40, 250))
    yield "tensor_full", "runtime.Tensor", tensor(
        41, 24, size=[2, 3], requires_grad=True, dtype="float32", compression=C.NONE
    )
    yield "tensor_chunked_head", "runtime.Tensor", tensor(
        42, 100, size=[7, 300000], dtype="float16", compression=C.FLOAT16, chunks=3
    )
    yield "tensor_chunk_tail", "runtime.Tensor", tensor(43, 64)
    yield "tensor_scalar", "runtime.Tensor", tensor(44, 4, size=[], dtype="float32")
    yield "tensor_large_dims", "runtime.Tensor", tensor(
        45, 3, size=[4294967295, 1, 0], dtype="uint8", compression=C.BLOCKWISE_8BIT
    )
    yield "expert_request", "runtime.ExpertRequest", runtime_pb2.ExpertRequest(
        uid="ffn.3.7",
        tensors=[
            tensor(46, 32, size=[2, 4], dtype="float32", requires_grad=True),
            tensor(47, 16, size=[2, 4], dtype="float16", compression=C.FLOAT16),
        ],
        metadata=pat(48, 5),
    )
    yield "expert_response", "runtime.ExpertResponse", runtime_pb2.ExpertResponse(
        tensors=[tensor(49, 40, size=[10], dtype="float32", compression=C.MEANSTD_16BIT)]
    )
    yield "expert_response_empty", "runtime.ExpertResponse", runtime_pb2.ExpertResponse()
    yield "join_request", "averaging.JoinRequest", averaging_pb2.JoinRequest(
        schema_hash=pat(50, 20), expiration=1795759842.75, gather=pat(51, 12), client_mode=True,
        group_key="myrun_grad_averager.0b0110",
    )
    yield "message_from_leader", "averaging.MessageFromLeader", averaging_pb2.MessageFromLeader(
        code=M.BEGIN_ALLREDUCE, group_id=pat(52, 20), suggested_leader=pat(53, 38),
        ordered_peer_ids=[pat(54, 38), pat(55, 34)], gathered=[pat(56, 10), pat(57, 11)],
    )
    yield "message_from_leader_rejection", "averaging.MessageFromLeader", averaging_pb2.MessageFromLeader(
        code=M.BAD_GROUP_KEY
    )
    yield "averaging_data", "averaging.AveragingData", averaging_pb2.AveragingData(
        code=M.PART_FOR_AVERAGING, group_id=pat(58, 20), peer_id=pat(59, 38),
        tensor_part=tensor(60, 48, size=[12], dtype="float32", compression=C.UNIFORM_8BIT), weight=16.0,
    )
    yield "download_request", "averaging.DownloadRequest", averaging_pb2.DownloadRequest()
    yield "download_data", "averaging.DownloadData", averaging_pb2.DownloadData(
        metadata=pat(61, 30), tensor_part=tensor(62, 20, size=[5], dtype="float32", compression=C.QUANTILE_8BIT)
    )
    yield "access_token", "auth.AccessToken", access_token()
    yield "request_auth_info", "auth.RequestAuthInfo", request_auth()
    yield "response_auth_info", "auth.ResponseAuthInfo", response_auth()
    yield "test_request", "test.TestRequest", test_pb2.TestRequest(number=-7)
    yield "test_response", "test.TestResponse", test_pb2.TestResponse(number=49)
    yield "public_key_ed25519", "crypto.PublicKey", crypto_pb2.PublicKey(key_type=crypto_pb2.Ed25519, data=pat(70, 32))
    yield "private_key_rsa", "crypto.PrivateKey", crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=pat(71, 1190))
    yield "public_key_rsa_empty_data", "crypto.PublicKey", crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=b"")
    yield "envelope_call_unary", "p2pd.PersistentConnectionRequest", p2pd_pb2.PersistentConnectionRequest(
        callId=pat(80, 16),
        callUnary=p2pd_pb2.CallUnaryRequest(peer=pat(81, 38), proto="DHTProtocol.rpc_find", data=pat(82, 50)),
    )
    yield "envelope_call_unary_empty_data", "p2pd.PersistentConnectionRequest", p2pd_pb2.PersistentConnectionRequest(
        callId=pat(83, 16),
        callUnary=p2pd_pb2.CallUnaryRequest(peer=pat(84, 38), proto="ExampleServicer.rpc_square", data=b""),
    )
    yield "envelope_unary_response", "p2pd.PersistentConnectionRequest", p2pd_pb2.PersistentConnectionRequest(
        callId=pat(80, 16), unaryResponse=p2pd_pb2.CallUnaryResponse(response=pat(85, 70))
    )
    yield "envelope_unary_response_empty", "p2pd.PersistentConnectionRequest", p2pd_pb2.PersistentConnectionRequest(
        callId=pat(80, 16), unaryResponse=p2pd_pb2.CallUnaryResponse(response=b"")
    )
    yield "envelope_unary_error", "p2pd.PersistentConnectionRequest", p2pd_pb2.PersistentConnectionRequest(
        callId=pat(80, 16),
        unaryResponse=p2pd_pb2.CallUnaryResponse(error=b"ValueError('Expert ffn.9.9 not found')"),
    )
    yield "envelope_cancel", "p2pd.PersistentConnectionRequest", p2pd_pb2.PersistentConnectionRequest(
        callId=pat(86, 16), cancel=p2pd_pb2.Cancel()
    )
    yield "envelope_add_handler", "p2pd.PersistentConnectionRequest", p2pd_pb2.PersistentConnectionRequest(
        callId=pat(87, 16),
        addUnaryHandler=p2pd_pb2.AddUnaryHandlerRequest(proto="ConnectionHandler.rpc_forward", balanced=True),
    )
    yield "envelope_remove_handler", "p2pd.PersistentConnectionRequest", p2pd_pb2.PersistentConnectionRequest(
        callId=pat(88, 16), removeUnaryHandler=p2pd_pb2.RemoveUnaryHandlerRequest(proto="DHTProtocol.rpc_ping")
    )
    yield "daemon_request_handling", "p2pd.PersistentConnectionResponse", p2pd_pb2.PersistentConnectionResponse(
        callId=pat(89, 16),
        requestHandling=p2pd_pb2.CallUnaryRequest(peer=pat(90, 38), proto="DHTProtocol.rpc_store", data=pat(91, 33)),
    )
    yield "daemon_call_response", "p2pd.PersistentConnectionResponse", p2pd_pb2.PersistentConnectionResponse(
        callId=pat(89, 16), callUnaryResponse=p2pd_pb2.CallUnaryResponse(response=pat(92, 12))
    )
    yield "daemon_error", "p2pd.PersistentConnectionResponse", p2pd_pb2.PersistentConnectionResponse(
        callId=pat(89, 16), daemonError=p2pd_pb2.DaemonError(message="handler not found")
    )
    yield "rpc_error", "p2pd.RPCError", p2pd_pb2.RPCError(message="Exception('boom')")
    yield "rpc_error_end_of_stream", "p2pd.RPCError", p2pd_pb2.RPCError()
    yield "control_persistent_upgrade", "p2pd.Request", p2pd_pb2.Request(type=p2pd_pb2.Request.PERSISTENT_CONN_UPGRADE)
    yield "control_stream_open", "p2pd.Request", p2pd_pb2.Request(
        type=p2pd_pb2.Request.STREAM_OPEN,
        streamOpen=p2pd_pb2.StreamOpenRequest(peer=pat(93, 38), proto=["ConnectionHandler.rpc_forward_stream"], timeout=30),
    )
    yield "control_response_ok", "p2pd.Response", p2pd_pb2.Response(type=p2pd_pb2.Response.OK)
    yield "control_response_identify", "p2pd.Response", p2pd_pb2.Response(
        type=p2pd_pb2.Response.OK, identify=p2pd_pb2.IdentifyResponse(id=pat(94, 38), addrs=[pat(95, 8), pat(96, 22)])
    )
    yield "stream_info", "p2pd.StreamInfo", p2pd_pb2.StreamInfo(
        peer=pat(97, 38), addr=pat(98, 8), proto="ConnectionHandler.rpc_backward_stream"
    )


def generate(out_dir: Path):
    out = []
    for name, message, msg in cases():
        missing = msg.FindInitializationErrors()
        assert not missing, f"{name}: proto2 required fields unset: {missing}"
        out.append({"name": name, "message": message, "hex": msg.SerializeToString().hex()})
    (out_dir / "messages.json").write_text(json.dumps({"cases": out}, indent=1) + "\n")


def cli(argv):
    p = argparse.ArgumentParser(prog="golden.py proto")
    p.add_argument("command", choices=["print"])
    p.parse_args(argv)
    for name, message, msg in cases():
        print(name, message, msg.SerializeToString().hex())


if __name__ == "__main__":
    cli(sys.argv[1:])
