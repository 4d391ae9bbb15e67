"""tritonclient (gRPC and HTTP) against AOTInductor packages served by Plinth.

Every fixture input of tests/fixtures/pt2 goes through both clients at batch
1 and at the package's maximum, and every answer must equal, bit for bit,
what PyTorch's own runner of the package answered (the expected_*.npy files
make.py wrote). One row more than the maximum must be refused naming the
input. Run by host integration tests with PLINTH_GRPC, PLINTH_HTTP and
PLINTH_FIXTURES set.
"""

import os
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

FIXTURES = Path(os.environ["PLINTH_FIXTURES"])
DATATYPES = {np.dtype("float32"): "FP32", np.dtype("float16"): "FP16", np.dtype("int64"): "INT64"}

# model, fixture, labels, input names, output names
CASES = [
    ("cnn", "cnn", ["b1", "b15"], ["image"], ["logits"]),
    ("branch", "branch", ["pos", "neg", "b16"], ["x"], ["y", "index"]),
    ("half", "half", ["b1", "b8"], ["x"], ["y"]),
]


def check(client_name, module, client, failures):
    for model, fixture, labels, inputs, outputs in CASES:
        for label in labels:
            arrays = [np.load(FIXTURES / fixture / f"input_{label}_{i}.npy") for i in range(len(inputs))]
            tensors = []
            for name, array in zip(inputs, arrays):
                tensor = module.InferInput(name, list(array.shape), DATATYPES[array.dtype])
                tensor.set_data_from_numpy(array)
                tensors.append(tensor)
            wanted = [module.InferRequestedOutput(name) for name in outputs]
            result = client.infer(model, tensors, outputs=wanted)
            for i, name in enumerate(outputs):
                expected = np.load(FIXTURES / fixture / f"expected_{label}_{i}.npy")
                got = result.as_numpy(name)
                if got is None or got.dtype != expected.dtype or got.shape != expected.shape \
                        or got.tobytes() != expected.tobytes():
                    failures.append(f"{client_name} {model} {label} {name}: got {got!r}, expected {expected!r}")
                else:
                    print(f"ok {client_name} {model} {label} {name} {list(got.shape)}")
    # One row over the package's maximum of 15.
    too_many = np.zeros((16, 3, 16, 16), dtype=np.float32)
    tensor = module.InferInput("image", list(too_many.shape), "FP32")
    tensor.set_data_from_numpy(too_many)
    try:
        client.infer("cnn", [tensor])
        failures.append(f"{client_name}: 16 rows to cnn were served")
    except InferenceServerException as err:
        text = str(err)
        if "image" not in text or "16" not in text or "15" not in text:
            failures.append(f"{client_name}: the refusal does not name the input and the rows: {text}")
        else:
            print(f"ok {client_name} refused 16 rows: {text}")
    metadata = client.get_model_metadata("cnn")
    platform = metadata["platform"] if isinstance(metadata, dict) else metadata.platform
    if platform != "pytorch_aoti":
        failures.append(f"{client_name}: cnn platform {platform!r}")


def main():
    failures = []
    check("grpc", grpcclient, grpcclient.InferenceServerClient(os.environ["PLINTH_GRPC"]), failures)
    check("http", httpclient, httpclient.InferenceServerClient(os.environ["PLINTH_HTTP"]), failures)
    for failure in failures:
        print("FAIL", failure)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
