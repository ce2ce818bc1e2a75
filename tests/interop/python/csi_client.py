"""plinth-interop-python: a CSI client as a Python tool writes one — grpcio with default channel
options on a unix: target — printing what it got as JSON for the Rust tests to check.

    python3 csi_client.py SOCKET_PATH

Stubs are generated at run time from the repository's proto/csi.proto with grpc_tools, so the
client speaks exactly the wire format plinth serves.
"""

import importlib
import json
import os
import pathlib
import sys
import tempfile

import grpc
from grpc_tools import protoc

PROTO_DIR = pathlib.Path(__file__).resolve().parents[3] / "proto"


def load_stubs(out_dir):
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    code = protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / "csi.proto"),
    ])
    if code != 0:
        raise SystemExit(f"protoc failed with {code}")
    sys.path.insert(0, out_dir)
    return importlib.import_module("csi_pb2"), importlib.import_module("csi_pb2_grpc")


def main():
    if len(sys.argv) != 2:
        raise SystemExit("usage: csi_client.py SOCKET_PATH")
    socket = sys.argv[1]
    with tempfile.TemporaryDirectory() as out_dir:
        pb, rpc = load_stubs(out_dir)
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            identity = rpc.IdentityStub(channel)
            info = identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10)
            caps = identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=10)
            probe = identity.Probe(pb.ProbeRequest(), timeout=10)
            out = {
                "name": info.name,
                "vendor_version": info.vendor_version,
                "capabilities": len(caps.capabilities),
                "ready": probe.ready.value if probe.HasField("ready") else None,
            }
            try:
                node = rpc.NodeStub(channel).NodeGetInfo(pb.NodeGetInfoRequest(), timeout=10)
                out["node_id"] = node.node_id
            except grpc.RpcError as err:
                out["node_error"] = f"{err.code().name}: {err.details()}"
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    main()
