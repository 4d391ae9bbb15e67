#!/usr/bin/env python3
"""Sanity check for a KServe v2 gRPC server serving the "double" model.

usage: check.py HOST:PORT [MODEL]   (MODEL defaults to "double")

Sends x = arange(16) as FP32 shape [16] and requires y == 2*x exactly.
Prints "ok" and exits 0 on success, prints the reason and exits 1 otherwise.
"""
import sys

import numpy as np


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    url = sys.argv[1]
    model = sys.argv[2] if len(sys.argv) == 3 else "double"
    try:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url=url)
        x = np.arange(16, dtype=np.float32)
        inp = grpcclient.InferInput("x", [16], "FP32")
        inp.set_data_from_numpy(x)
        out = grpcclient.InferRequestedOutput("y")
        result = client.infer(model_name=model, inputs=[inp], outputs=[out], client_timeout=30)
        y = result.as_numpy("y")
        if y is None:
            print("fail: no output 'y' in response")
            return 1
        if y.dtype != np.float32 or tuple(y.shape) != (16,):
            print(f"fail: got dtype={y.dtype} shape={y.shape}, want float32 (16,)")
            return 1
        if not np.array_equal(y, 2 * x):
            print(f"fail: y != 2x: {y}")
            return 1
    except Exception as e:  # connection refused, unknown model, ...
        print(f"fail: {type(e).__name__}: {e}")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
