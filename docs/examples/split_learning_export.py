"""Cut one CNN in two and export both halves (and the uncut model) as TorchScript.

With --server-format pt2, the server half is exported with torch.export and
compiled by AOTInductor into a package (model.pt2) instead: the format
PyTorch now recommends for serving from C++ (needs a C++ compiler).

    python split_learning_export.py --out split

writes

    split/models/cnn_server/config.toml     the server half, as a Plinth model repository
    split/models/cnn_server/1/model.pt
    split/client/client_half.pt              what the client runs
    split/client/uncut.pt                    the whole network, to check the split against

The weights are whatever a fixed seed gives; in a real deployment they come
from training. See docs/SPLIT_LEARNING.md.
"""

import argparse
import pathlib

import torch
from torch import nn

# The image the client holds, and where the network is cut: layers [0, CUT)
# run on the client, layers [CUT, end) on the server.
IMAGE = (3, 32, 32)
CUT = 3
MAX_BATCH_SIZE = 8


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # client: 3x32x32 -> 16x16x16
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # server from here on
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),                                            # 10 logits
    )


def trace(module: nn.Module, example: torch.Tensor, path: pathlib.Path) -> torch.Tensor:
    """Traces `module` on `example`, saves it to `path`, and returns its output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        traced = torch.jit.trace(module, example)
        traced.save(str(path))
        return traced(example)


def export_package(module: nn.Module, example: torch.Tensor, path: pathlib.Path) -> torch.Tensor:
    """Exports `module` with a dynamic batch dimension (1..MAX_BATCH_SIZE),
    compiles it into an AOTInductor package at `path`, and returns the
    package's output for `example`."""
    from torch.export import Dim

    path.parent.mkdir(parents=True, exist_ok=True)
    batch = Dim("batch", min=1, max=MAX_BATCH_SIZE)
    with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        return torch._inductor.aoti_load_package(str(path))(example)


def config_toml(activation_shape, logits_shape) -> str:
    # Shapes leave out the batch dimension: max_batch_size > 0 adds it.
    return (
        f"max_batch_size = {MAX_BATCH_SIZE}\n"
        "\n"
        "[[input]]\n"
        'name = "activation"\n'
        'dtype = "f32"\n'
        f"shape = {list(activation_shape)}\n"
        "\n"
        "[[output]]\n"
        'name = "logits"\n'
        'dtype = "f32"\n'
        f"shape = {list(logits_shape)}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("split"))
    parser.add_argument(
        "--server-format",
        choices=["torchscript", "pt2"],
        default="torchscript",
        help="the server half as TorchScript (model.pt) or as an AOTInductor package (model.pt2)",
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    model = cnn().eval()
    client_half, server_half = model[:CUT], model[CUT:]

    example = torch.zeros(2, *IMAGE)
    activation = trace(client_half, example, args.out / "client" / "client_half.pt")
    version = args.out / "models" / "cnn_server" / "1"
    if args.server_format == "pt2":
        logits = export_package(server_half, activation, version / "model.pt2")
    else:
        logits = trace(server_half, activation, version / "model.pt")
    trace(model, example, args.out / "client" / "uncut.pt")

    config = args.out / "models" / "cnn_server" / "config.toml"
    config.write_text(config_toml(activation.shape[1:], logits.shape[1:]))
    print(f"activation {list(activation.shape[1:])} -> logits {list(logits.shape[1:])}")
    print(f"wrote {config}, the server half as {args.server_format}, and the client files under {args.out}")


if __name__ == "__main__":
    main()
