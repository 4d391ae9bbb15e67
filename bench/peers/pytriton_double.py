#!/usr/bin/env python3
"""PyTriton peer for the benchmark: serves model "double" (y = 2 * x, FP32, shape [-1]).

usage: pytriton_double.py [--http-port N] [--grpc-port N] [--metrics-port N]

Ports default to the env vars PYTRITON_HTTP_PORT / PYTRITON_GRPC_PORT /
PYTRITON_METRICS_PORT, else 9000 / 9001 / 9002. Blocks in triton.serve();
SIGINT or SIGTERM stops Triton and cleans up its workspace.
Run it with the venv built from Debian's /usr/bin/python3 (see README.md).
"""
import argparse
import logging
import os
import signal

import numpy as np
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def infer(requests):
    # Without batching (max_batch_size=0) Triton hands us a list of requests.
    return [{"y": (r["x"] * np.float32(2.0)).astype(np.float32, copy=False)} for r in requests]


def _port(env, default):
    return int(os.environ.get(env, default))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--http-port", type=int, default=_port("PYTRITON_HTTP_PORT", 9000))
    p.add_argument("--grpc-port", type=int, default=_port("PYTRITON_GRPC_PORT", 9001))
    p.add_argument("--metrics-port", type=int, default=_port("PYTRITON_METRICS_PORT", 9002))
    args = p.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # serve() only handles KeyboardInterrupt; map SIGTERM onto it for a clean stop.
    def _on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_term)

    config = TritonConfig(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name="double",
            infer_func=infer,
            inputs=[Tensor(name="x", dtype=np.float32, shape=(-1,))],
            outputs=[Tensor(name="y", dtype=np.float32, shape=(-1,))],
            config=ModelConfig(batching=False, max_batch_size=0),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
