"""The client side of split learning: run the first layers here, stream the
activations to Plinth, get the logits back, and check them against the
uncut model.

    python -m grpc_tools.protoc -Iproto --python_out=stubs --grpc_python_out=stubs proto/plinth.proto
    PYTHONPATH=stubs python split_learning_client.py --client-dir split/client

Needs torch, numpy and grpcio, and the files split_learning_export.py wrote.
Exits 1 if any batch fails or differs from the uncut model by more than
--tolerance. See docs/SPLIT_LEARNING.md.
"""

import argparse
import collections
import pathlib
import sys

import grpc
import numpy as np
import torch

import plinth_pb2 as pb
import plinth_pb2_grpc as rpc


def tensor_message(name: str, tensor: torch.Tensor) -> pb.Tensor:
    """A plinth.v1 Tensor: row-major, little-endian."""
    array = tensor.detach().contiguous().numpy().astype("<f4", copy=False)
    return pb.Tensor(name=name, dtype=pb.DATA_TYPE_FLOAT32, shape=list(array.shape), data=array.tobytes())


def tensor_values(message: pb.Tensor) -> np.ndarray:
    if message.dtype != pb.DATA_TYPE_FLOAT32:
        raise ValueError(f"tensor '{message.name}' is {pb.DataType.Name(message.dtype)}, not FLOAT32")
    return np.frombuffer(message.data, dtype="<f4").reshape(tuple(message.shape))


STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:8001", help="Plinth's gRPC address")
    parser.add_argument("--model", default="cnn_server")
    parser.add_argument("--version", default="",
                        help="the server half's version to use (empty: the newest ready one); "
                             "pin it to the version exported with your client half")
    parser.add_argument("--client-dir", type=pathlib.Path, default=pathlib.Path("split/client"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 3], help="batch sizes, one message each")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--mistake", action="store_true",
                        help="also send, after the second batch, raw images instead of activations "
                             "(a client that skipped its half): that message alone must fail")
    args = parser.parse_args()

    client_half = torch.jit.load(str(args.client_dir / "client_half.pt")).eval()
    uncut = torch.jit.load(str(args.client_dir / "uncut.pt")).eval()
    images = torch.Generator().manual_seed(1234)

    # What should come back for each message, in the order sent: the uncut
    # model's logits, or None for the deliberate mistake. The request
    # iterator runs on grpcio's thread and appends before each message goes
    # out; answers come back in request order.
    expected = collections.deque()

    def requests():
        for idx, n in enumerate(args.batches):
            batch = torch.rand(n, 3, 32, 32, generator=images) * 2 - 1
            with torch.inference_mode():
                activation = client_half(batch)  # the first layers run here
                expected.append((f"batch-{idx}", uncut(batch).numpy()))
            yield pb.ComputeRequest(id=f"batch-{idx}", model=args.model, version=args.version,
                                    inputs=[tensor_message("activation", activation)])
            if args.mistake and idx == 1:
                expected.append(("raw-images", None))
                yield pb.ComputeRequest(id="raw-images", model=args.model, version=args.version,
                                        inputs=[tensor_message("activation", batch)])

    channel = grpc.insecure_channel(args.server)
    stream = rpc.ComputeServiceStub(channel).StreamCompute(requests())
    failed = False
    n_answers = 0
    for response in stream:
        n_answers += 1
        want_id, want = expected.popleft()
        if response.id != want_id:
            print(f"{response.id}: answered out of order (expected {want_id})")
            return 1
        if response.HasField("error"):
            # A bad message gets its error in band; the stream goes on.
            print(f"{response.id}: {STATUS_NAMES.get(response.error.code, response.error.code)}: "
                  f"{response.error.message}")
            failed |= want is not None
            continue
        if want is None:
            print(f"{response.id}: answered, but it should have failed")
            failed = True
            continue
        logits = tensor_values(next(t for t in response.outputs if t.name == "logits"))
        if logits.shape != want.shape:
            print(f"{response.id}: logits {list(logits.shape)}, expected {list(want.shape)}")
            failed = True
            continue
        diff = float(np.abs(logits - want).max())
        ok = diff <= args.tolerance
        failed |= not ok
        print(f"{response.id}: logits {list(logits.shape)}, max |served - uncut| = {diff:.2e}"
              f"{'' if ok else f'  MISMATCH (tolerance {args.tolerance:g})'}")
    if expected:
        print(f"{len(expected)} messages got no answer")
        return 1
    if failed:
        print("FAILED")
        return 1
    print(f"{n_answers} answers in order; every batch matches the uncut model within {args.tolerance:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
