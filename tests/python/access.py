#!/usr/bin/env python3
"""One call per API group through the stock tritonclient (grpc and http),
plus a raw gRPC call for the plugins group, which tritonclient lacks.

Run by the Rust tests in tests/tests/integration/security.rs, which read
one JSON object per line from stdout:

  {"proto": "grpc", "group": "inference", "outcome": "ok" | <status>, "message": ...}

where <status> is the gRPC code name (UNAUTHENTICATED, ...) or the HTTP
status (401, ...). The environment says where and how to call:

  PLINTH_GRPC, PLINTH_HTTP   host:port of each port
  PLINTH_TOKEN               bearer token to send (none if unset)
  PLINTH_TLS_CA              CA file: use TLS and trust this CA
  PLINTH_TLS_CERT/_KEY       client certificate for mutual TLS (optional)

The model `scale` (FP32 x [-1] -> y = 2x) must be loaded.
"""

import json
import os
import sys

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

GRPC = os.environ["PLINTH_GRPC"]
HTTP = os.environ["PLINTH_HTTP"]
TOKEN = os.environ.get("PLINTH_TOKEN")
CA = os.environ.get("PLINTH_TLS_CA")
CERT = os.environ.get("PLINTH_TLS_CERT")
KEY = os.environ.get("PLINTH_TLS_KEY")


def headers():
    """A fresh dict per call: tritonclient adds its own entries to the one it is given."""
    return {"authorization": f"Bearer {TOKEN}"} if TOKEN else None


def grpc_client():
    if not CA:
        return grpcclient.InferenceServerClient(url=GRPC)
    return grpcclient.InferenceServerClient(
        url=GRPC, ssl=True, root_certificates=CA, private_key=KEY, certificate_chain=CERT)


def http_client():
    if not CA:
        return httpclient.InferenceServerClient(url=HTTP)
    options = {"ca_certs": CA}
    if CERT:
        options.update(certfile=CERT, keyfile=KEY)
    return httpclient.InferenceServerClient(url=HTTP, ssl=True, ssl_options=options)


def infer(mod, client):
    x = mod.InferInput("x", [3], "FP32")
    values = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    x.set_data_from_numpy(values)
    result = client.infer("scale", [x], headers=headers())
    y = result.as_numpy("y")
    if not np.array_equal(y, values * 2):
        raise AssertionError(f"wrong numbers: {y}")


def live(client):
    # tritonclient's http is_server_live answers False on any non-200
    # status instead of raising: say so.
    if not client.is_server_live(headers=headers()):
        raise AssertionError("not live")


def plugins():
    """plinth.v1.PluginService/ListPlugins with an empty request."""
    target = GRPC
    if CA:
        with open(CA, "rb") as f:
            root = f.read()
        key = open(KEY, "rb").read() if KEY else None
        chain = open(CERT, "rb").read() if CERT else None
        creds = grpc.ssl_channel_credentials(root, key, chain)
        channel = grpc.secure_channel(target, creds)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        call = channel.unary_unary("/plinth.v1.PluginService/ListPlugins")
        metadata = list(headers().items()) if TOKEN else None
        call(b"", metadata=metadata, timeout=30)


CALLS = {
    "health": live,
    "metadata": lambda c: c.get_model_metadata("scale", headers=headers()),
    "statistics": lambda c: c.get_inference_statistics("scale", headers=headers()),
    "model-repository": lambda c: c.get_model_repository_index(headers=headers()),
    "shared-memory": lambda c: c.get_system_shared_memory_status(headers=headers()),
}


def outcome(proto, group, call):
    try:
        call()
        result, message = "ok", ""
    except InferenceServerException as err:
        status = str(err.status() or "")
        result = status.removeprefix("StatusCode.") or "error"
        message = err.message()
    except grpc.RpcError as err:
        result, message = err.code().name, err.details()
    except AssertionError as err:
        result, message = "failed", str(err)
    except Exception as err:  # a transport failure: TLS refused, reset, ...
        result, message = "transport", f"{type(err).__name__}: {err}"
    print(json.dumps({"proto": proto, "group": group, "outcome": result, "message": message}))
    sys.stdout.flush()


def main():
    for proto, mod, make in (("grpc", grpcclient, grpc_client), ("http", httpclient, http_client)):
        try:
            client = make()
        except Exception as err:
            for group in list(CALLS) + ["inference"]:
                print(json.dumps({"proto": proto, "group": group, "outcome": "transport",
                                  "message": f"{type(err).__name__}: {err}"}))
            continue
        for group, call in CALLS.items():
            outcome(proto, group, lambda: call(client))
        outcome(proto, "inference", lambda: infer(mod, client))
    outcome("grpc", "plugins", plugins)


if __name__ == "__main__":
    main()
