"""tritonclient's own system shared-memory calls against Plinth, unmodified.

For each client (gRPC, then HTTP), on the `scale` model (y = 2x):
- a 16 MiB f32 input read in place from one region at an offset, and its
  output written in place into another region, read back with
  `tritonclient.utils.shared_memory` and compared with 2x exactly;
- an input from shared memory with the output in the answer;
- status, the errors a client meets (past the end, unknown region, the CUDA
  calls), and unregistering, after which status is empty.
Prints one line per client, which the test checks.
"""

import os
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

N = 4 * 1024 * 1024  # 16 MiB of f32
OFFSET = 4096


def expect_error(what, call, *needles):
    try:
        call()
    except InferenceServerException as err:
        text = str(err)
        for needle in needles:
            assert needle in text, f"{what}: {needle!r} not in {text!r}"
        return
    raise AssertionError(f"{what}: no error")


def run(module, client, tag):
    pid = os.getpid()
    values = (np.arange(N, dtype=np.float32) % 1000.0) - 500.25
    nbytes = values.nbytes
    client.unregister_system_shared_memory()
    in_handle = shm.create_shared_memory_region(f"in_{tag}", f"/plinth_in_{tag}_{pid}", OFFSET + nbytes)
    out_handle = shm.create_shared_memory_region(f"out_{tag}", f"/plinth_out_{tag}_{pid}", nbytes)
    try:
        shm.set_shared_memory_region(in_handle, [values], offset=OFFSET)
        client.register_system_shared_memory(f"in_{tag}", f"/plinth_in_{tag}_{pid}", OFFSET + nbytes)
        client.register_system_shared_memory(f"out_{tag}", f"/plinth_out_{tag}_{pid}", nbytes)

        status = client.get_system_shared_memory_status()
        names = sorted(r.name for r in status.regions.values()) if module is grpcclient else sorted(r["name"] for r in status)
        assert names == [f"in_{tag}", f"out_{tag}"], names

        # In and out through shared memory.
        x = module.InferInput("x", [N], "FP32")
        x.set_shared_memory(f"in_{tag}", nbytes, offset=OFFSET)
        y = module.InferRequestedOutput("y")
        y.set_shared_memory(f"out_{tag}", nbytes)
        result = client.infer("scale", [x], outputs=[y])
        out = result.get_output("y")
        shape = list(out.shape) if module is grpcclient else out["shape"]
        assert shape == [N], shape
        got = shm.get_contents_as_numpy(out_handle, np.float32, shape)
        assert np.array_equal(got, values * 2.0), "output in shared memory differs from 2x"

        # In through shared memory, out in the answer (a 1 KiB slice).
        x = module.InferInput("x", [256], "FP32")
        x.set_shared_memory(f"in_{tag}", 1024, offset=OFFSET + 1024)
        result = client.infer("scale", [x])
        assert np.array_equal(result.as_numpy("y"), values[256:512] * 2.0)

        # What a client gets wrong is named.
        x = module.InferInput("x", [N], "FP32")
        x.set_shared_memory(f"in_{tag}", nbytes, offset=OFFSET + 4)
        expect_error("past the end", lambda: client.infer("scale", [x]), "runs past its end", f"in_{tag}")
        x = module.InferInput("x", [4], "FP32")
        x.set_shared_memory("nobody", 16)
        expect_error("unknown region", lambda: client.infer("scale", [x]), "'nobody' is not registered")
        x = module.InferInput("x", [4], "FP32")
        x.set_shared_memory(f"in_{tag}", 12)
        expect_error("byte size", lambda: client.infer("scale", [x]), "needs 16 bytes, got 12")
        x = module.InferInput("x", [N], "FP32")
        x.set_shared_memory(f"in_{tag}", nbytes, offset=OFFSET)
        y = module.InferRequestedOutput("y")
        y.set_shared_memory(f"out_{tag}", 64)
        expect_error("small output", lambda: client.infer("scale", [x], outputs=[y]), "output 'y'", "is 64")
        expect_error(
            "register twice",
            lambda: client.register_system_shared_memory(f"in_{tag}", f"/plinth_in_{tag}_{pid}", 16),
            "already registered",
        )
        expect_error(
            "register past the object",
            lambda: client.register_system_shared_memory("big", f"/plinth_out_{tag}_{pid}", nbytes + 1),
            "runs past its end",
        )
        expect_error("status of unknown", lambda: client.get_system_shared_memory_status("nobody"), "not registered")
        expect_error("cuda status", lambda: client.get_cuda_shared_memory_status(), "CUDA shared memory is not supported")
        expect_error("cuda unregister", lambda: client.unregister_cuda_shared_memory(), "CUDA shared memory is not supported")

        client.unregister_system_shared_memory(f"in_{tag}")
        status = client.get_system_shared_memory_status()
        count = len(status.regions) if module is grpcclient else len(status)
        assert count == 1, status
        client.unregister_system_shared_memory()
        status = client.get_system_shared_memory_status()
        count = len(status.regions) if module is grpcclient else len(status)
        assert count == 0, status
    finally:
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)
    assert shm.mapped_shared_memory_regions() == [], shm.mapped_shared_memory_regions()
    print(f"{tag}: shared memory ok, {N} floats in place both ways")


def main():
    run(grpcclient, grpcclient.InferenceServerClient(os.environ["PLINTH_GRPC"]), "grpc")
    run(httpclient, httpclient.InferenceServerClient(os.environ["PLINTH_HTTP"]), "http")
    return 0


if __name__ == "__main__":
    sys.exit(main())
