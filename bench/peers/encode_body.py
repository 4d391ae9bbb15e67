#!/usr/bin/env python3
"""Write a pre-encoded gRPC request body for inference.GRPCInferenceService/ModelInfer.

usage: encode_body.py [MODEL] [OUTPUT]   (defaults: double, body.bin)

The body is one gRPC length-prefixed message: 1 byte compression flag (0),
4-byte big-endian length, then the serialized ModelInferRequest carrying
x = arange(16) as FP32 shape [16] in raw_input_contents. Feed it to h2load:

  h2load -n 5000 -c 16 -m 4 -H 'content-type: application/grpc' -H 'te: trailers' \
      -d body.bin http://127.0.0.1:PORT/inference.GRPCInferenceService/ModelInfer
"""
import struct
import sys

import numpy as np
from tritonclient.grpc import service_pb2


def main() -> int:
    model = sys.argv[1] if len(sys.argv) > 1 else "double"
    path = sys.argv[2] if len(sys.argv) > 2 else "body.bin"
    req = service_pb2.ModelInferRequest(model_name=model)
    inp = req.inputs.add()
    inp.name = "x"
    inp.datatype = "FP32"
    inp.shape.append(16)
    req.outputs.add().name = "y"
    req.raw_input_contents.append(np.arange(16, dtype="<f4").tobytes())
    msg = req.SerializeToString()
    with open(path, "wb") as f:
        f.write(b"\x00" + struct.pack(">I", len(msg)) + msg)
    print(f"wrote {path}: {5 + len(msg)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
