"""One gRPC call to a sigil Unix-socket API with Python grpcio (gRPC C-core), printed as one JSON line.

Usage: grpc_interop.py STUBS_DIR TARGET CASE [ARG...]
  STUBS_DIR  where `python3 -m grpc_tools.protoc` wrote the stubs for crates/proto/proto
  TARGET     a grpcio target: unix:relative/or/absolute/path or unix:///absolute/path
  CASE       which call (see CASES below)

The channel uses grpcio's default options: C-core sends the socket path as the HTTP/2 :authority,
which is what this client exists to exercise. The output is {"code": "<grpc.StatusCode name>", ...}.
"""

import json
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402

import workload_pb2  # noqa: E402
import workload_pb2_grpc  # noqa: E402
from sigil.admin.v1 import admin_pb2, admin_pb2_grpc  # noqa: E402
from sigil.netd.v1 import netd_pb2, netd_pb2_grpc  # noqa: E402
from spire.api.agent.delegatedidentity.v1 import (  # noqa: E402
    delegatedidentity_pb2,
    delegatedidentity_pb2_grpc,
)
from spire.api.types import selector_pb2  # noqa: E402

WORKLOAD_HEADER = (("workload.spiffe.io", "true"),)
TIMEOUT = 10


def workload_x509(ch, header="header"):
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch)
    md = WORKLOAD_HEADER if header == "header" else ()
    first = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=md, timeout=TIMEOUT))
    return {"spiffe_ids": [s.spiffe_id for s in first.svids]}


def workload_jwt(ch, audience):
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch)
    resp = stub.FetchJWTSVID(
        workload_pb2.JWTSVIDRequest(audience=[audience]), metadata=WORKLOAD_HEADER, timeout=TIMEOUT
    )
    return {"spiffe_ids": [s.spiffe_id for s in resp.svids]}


def workload_bundles(ch):
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch)
    first = next(
        stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=WORKLOAD_HEADER, timeout=TIMEOUT)
    )
    return {"trust_domains": sorted(first.bundles.keys())}


def delegated_x509(ch, uid):
    stub = delegatedidentity_pb2_grpc.DelegatedIdentityStub(ch)
    req = delegatedidentity_pb2.SubscribeToX509SVIDsRequest(
        selectors=[selector_pb2.Selector(type="unix", value="uid:" + uid)]
    )
    first = next(stub.SubscribeToX509SVIDs(req, timeout=TIMEOUT))
    ids = ["spiffe://%s%s" % (s.x509_svid.id.trust_domain, s.x509_svid.id.path) for s in first.x509_svids]
    return {"spiffe_ids": ids}


def admin_list_entries(ch):
    stub = admin_pb2_grpc.EntriesStub(ch)
    resp = stub.ListEntries(admin_pb2.ListEntriesRequest(), timeout=TIMEOUT)
    return {"spiffe_ids": sorted(e.spiffe_id for e in resp.entries)}


def admin_create_entry(ch, spiffe_id, parent_id, selector):
    stub = admin_pb2_grpc.EntriesStub(ch)
    kind, _, value = selector.partition(":")
    entry = admin_pb2.Entry(
        spiffe_id=spiffe_id, parent_id=parent_id, selectors=[admin_pb2.Selector(type=kind, value=value)]
    )
    resp = stub.CreateEntry(admin_pb2.CreateEntryRequest(entry=entry), timeout=TIMEOUT)
    return {"spiffe_ids": [resp.entry.spiffe_id]}


def netd_status(ch):
    resp = netd_pb2_grpc.StatusStub(ch).GetStatus(netd_pb2.GetStatusRequest(), timeout=TIMEOUT)
    return {"node_name": resp.node_name, "pod_cidr": resp.pod_cidr}


def netd_list_endpoints(ch):
    resp = netd_pb2_grpc.EndpointsStub(ch).ListEndpoints(netd_pb2.ListEndpointsRequest(), timeout=TIMEOUT)
    return {"names": sorted(e.name for e in resp.endpoints)}


def netd_create_endpoint(ch, name):
    resp = netd_pb2_grpc.EndpointsStub(ch).CreateEndpoint(
        netd_pb2.CreateEndpointRequest(name=name, labels=["app=interop"]), timeout=TIMEOUT
    )
    return {"names": [resp.name]}


HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def health(ch, service=""):
    # grpc.health.v1 by hand: stubs generated into a `grpc/` directory cannot be imported beside
    # the installed `grpc` package. HealthCheckRequest is field 1 (string); the response's
    # status is field 1 (varint).
    name = service.encode()
    assert len(name) < 128
    check = ch.unary_unary("/grpc.health.v1.Health/Check")
    resp = check(b"\x0a" + bytes([len(name)]) + name if name else b"", timeout=TIMEOUT)
    status = resp[1] if len(resp) >= 2 and resp[0] == 0x08 else 0
    return {"status": HEALTH_STATUS.get(status, str(status))}


CASES = {
    "health": health,
    "workload-x509": workload_x509,
    "workload-jwt": workload_jwt,
    "workload-bundles": workload_bundles,
    "delegated-x509": delegated_x509,
    "admin-list-entries": admin_list_entries,
    "admin-create-entry": admin_create_entry,
    "netd-status": netd_status,
    "netd-list-endpoints": netd_list_endpoints,
    "netd-create-endpoint": netd_create_endpoint,
}


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
