"""A stock Python gRPC client (grpcio, default channel options) against metald's unix socket.

It knows nothing of metald's .proto: it asks the health service whether metald serves, learns
the API through server reflection (v1alpha, what grpcio-reflection speaks, and v1), builds its
messages from the descriptors it got, and takes a VM through its whole lifecycle. It prints one
JSON object with what it saw, for the Rust test (tests/clients.rs) to check.

Usage: stock_client.py SOCKET CREATE_REQUEST_JSON
"""

import json
import sys

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "metald.v1.VmService"


def main():
    sock, create = sys.argv[1], json.loads(sys.argv[2])
    # Default options: since grpc-core 1.57 this sends the percent-encoded socket path as the
    # HTTP/2 :authority.
    channel = grpc.insecure_channel(f"unix:{sock}")
    out = {}

    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status
    out["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    # Reflection, v1alpha: the services, then the API described without any .proto.
    db = ProtoReflectionDescriptorDatabase(channel)
    out["services"] = sorted(db.get_services())
    pool = DescriptorPool(db)
    svc = pool.FindServiceByName(SERVICE)
    out["methods"] = sorted(m.name for m in svc.methods)

    # Reflection, v1: the same list through the newer service, called by hand.
    v1 = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=v1alpha_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=v1alpha_pb2.ServerReflectionResponse.FromString,
    )
    replies = list(v1(iter([v1alpha_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    out["services_v1"] = sorted(s.name for s in replies[0].list_services_response.service)

    def call(method, body):
        m = svc.FindMethodByName(method)
        req = message_factory.GetMessageClass(m.input_type)
        resp = message_factory.GetMessageClass(m.output_type)
        stub = channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=req.SerializeToString,
            response_deserializer=resp.FromString,
        )
        reply = stub(json_format.ParseDict(body, req()), timeout=120)
        return json_format.MessageToDict(reply, preserving_proto_field_name=True)

    vm = create["vm_id"]
    steps = []

    def step(method, body):
        reply = call(method, body)
        info = call("GetVmInfo", {"vm_id": vm})["vm"]
        steps.append({"call": method, "state": info.get("state", "VM_STATE_UNSPECIFIED")})
        if method == "BootVm":
            out["vmm"] = info.get("vmm", {})
        return reply

    step("CreateVm", create)
    step("BootVm", {"vm_id": vm})
    step("PauseVm", {"vm_id": vm})
    step("ResumeVm", {"vm_id": vm})
    step("RebootVm", {"vm_id": vm})
    listed = call("ListVms", {})
    out["listed"] = [v["vm_id"] for v in listed.get("vms", [])]
    step("ShutdownVm", {"vm_id": vm, "force": True})
    call("DeleteVm", {"vm_id": vm, "force": True})
    out["steps"] = steps

    try:
        call("GetVmInfo", {"vm_id": vm})
        out["after_delete"] = "OK"
    except grpc.RpcError as e:
        out["after_delete"] = e.code().name

    # A stream, as a watcher would hold one: it must carry on until the client ends it.
    watch = channel.unary_stream(
        f"/{SERVICE}/WatchEvents",
        request_serializer=message_factory.GetMessageClass(
            svc.FindMethodByName("WatchEvents").input_type
        ).SerializeToString,
        response_deserializer=lambda b: b,
    )
    stream = watch(
        message_factory.GetMessageClass(svc.FindMethodByName("WatchEvents").input_type)(),
        timeout=1,
    )
    try:
        for _ in stream:
            pass
        out["watch"] = "ended"
    except grpc.RpcError as e:
        out["watch"] = e.code().name
    print(json.dumps(out))


if __name__ == "__main__":
    main()
