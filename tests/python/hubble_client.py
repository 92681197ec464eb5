"""A Hubble Observer API client in Python grpcio, built from sigil's own observer/flow/relay .proto
files by grpc_tools.protoc (a second toolchain beside prost/tonic). Prints one JSON line.

Usage: hubble_client.py STUBS_DIR TARGET CASE [ARG...]
  STUBS_DIR  where `python3 -m grpc_tools.protoc` wrote the stubs for flow/, relay/, observer/
  TARGET     a grpcio target: unix:/abs/path or 127.0.0.1:PORT
  CASE       status | nodes | health | flows REQUEST_JSON MAX [TIMEOUT_S]

`flows` sends the GetFlowsRequest given as JSON (protobuf JSON mapping, e.g.
{"number": 5, "whitelist": [{"verdict": ["DROPPED"]}]}), reads at most MAX responses (then
cancels the stream) and prints {"code": ..., "responses": [...]} with every response in the JSON
mapping with the .proto field names. A stream still open at TIMEOUT_S (default 10) ends with
DEADLINE_EXCEEDED and the responses read so far. Before reading, it prints nothing; after the
call is accepted it writes "started" on stderr so a caller can make traffic while it follows.
"""

import json
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from google.protobuf import json_format  # noqa: E402

from observer import observer_pb2, observer_pb2_grpc  # noqa: E402

HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def to_dict(msg):
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def status(ch):
    stub = observer_pb2_grpc.ObserverStub(ch)
    return to_dict(stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10))


def nodes(ch):
    stub = observer_pb2_grpc.ObserverStub(ch)
    return to_dict(stub.GetNodes(observer_pb2.GetNodesRequest(), timeout=10))


def health(ch, service="hubble.server.Observer"):
    # grpc.health.v1 by hand (stubs in a `grpc/` directory would shadow the grpc package):
    # HealthCheckRequest.service is field 1, the response's status is field 1 (varint).
    name = service.encode()
    check = ch.unary_unary("/grpc.health.v1.Health/Check")
    resp = check(b"\x0a" + bytes([len(name)]) + name if name else b"", timeout=10)
    code = resp[1] if len(resp) >= 2 and resp[0] == 0x08 else 0
    return {"status": HEALTH_STATUS.get(code, str(code))}


def flows(ch, request_json, max_n, timeout_s="10"):
    stub = observer_pb2_grpc.ObserverStub(ch)
    req = json_format.Parse(request_json, observer_pb2.GetFlowsRequest())
    call = stub.GetFlows(req, timeout=float(timeout_s))
    out = []
    try:
        sys.stderr.write("started\n")
        sys.stderr.flush()
        for resp in call:
            out.append(to_dict(resp))
            if len(out) >= int(max_n):
                call.cancel()
                break
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.CANCELLED and len(out) >= int(max_n):
            pass
        elif e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return {"code": "DEADLINE_EXCEEDED", "responses": out}
        else:
            raise
    return {"responses": out}


CASES = {"status": status, "nodes": nodes, "health": health, "flows": flows}


def main():
    target, case, args = sys.argv[2], sys.argv[3], sys.argv[4:]
    with grpc.insecure_channel(target) as ch:
        try:
            out = {"code": "OK"}
            out.update(CASES[case](ch, *args))
        except grpc.RpcError as e:
            out = {"code": e.code().name, "details": e.details()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
