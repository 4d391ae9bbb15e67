#!/usr/bin/env python3
"""Plinth against the official tritonclient (grpc and http), unmodified.

Run by the Rust test `oip::tritonclient_conformance`, which starts a server
holding these models and passes its addresses in PLINTH_GRPC / PLINTH_HTTP:

  affine      FP32 x [-1, 4] -> y [-1, 3], y = x @ W^T + b (tests/src/fixtures.rs)
  double_i64  INT64 x [-1] -> y = 2x
  scale       FP32 x [-1] -> y = 2x (no batch dimension)
  text_len    BYTES text [-1] -> the byte-tokenize plugin (max-len 8) -> INT64
              length [-1, 1]: the count of non-padding tokens

Requests the stock clients refuse to build (malformed JSON, negative dims,
...) are sent with urllib, also a client nobody here wrote.
"""

import json
import os
import queue
import unittest
import urllib.error
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

GRPC = os.environ["PLINTH_GRPC"]
HTTP = os.environ["PLINTH_HTTP"]

# The weights of the affine fixture (tests/src/fixtures.rs: AFFINE_W, AFFINE_B).
W = np.array([1, 2, 0, 0, 0, 0, 1, -1, 0.5, 0.5, 0.5, 0.5], dtype=np.float32).reshape(3, 4)
B = np.array([0.25, -1, 10], dtype=np.float32)
ROWS = np.array([[1, 2, 3, 4], [4, -3, 1, 0]], dtype=np.float32)


def affine(x):
    return x @ W.T + B


def clients():
    return (
        ("grpc", grpcclient, grpcclient.InferenceServerClient(url=GRPC)),
        ("http", httpclient, httpclient.InferenceServerClient(url=HTTP)),
    )


def post(path, body, headers=None):
    """POST raw bytes to the HTTP port: (status, parsed JSON body or None)."""
    req = urllib.request.Request(
        f"http://{HTTP}{path}", data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(path):
    try:
        with urllib.request.urlopen(f"http://{HTTP}{path}") as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class HealthAndMetadata(unittest.TestCase):
    def test_server_live_ready_and_metadata(self):
        for proto, _, c in clients():
            with self.subTest(proto):
                self.assertTrue(c.is_server_live())
                self.assertTrue(c.is_server_ready())
                meta = c.get_server_metadata()
                if proto == "grpc":
                    name, extensions = meta.name, list(meta.extensions)
                else:
                    name, extensions = meta["name"], meta["extensions"]
                self.assertEqual(name, "plinth")
                for ext in ("model_repository", "statistics", "model_configuration",
                            "classification", "binary_tensor_data"):
                    self.assertIn(ext, extensions)

    def test_model_ready_metadata_and_config(self):
        for proto, _, c in clients():
            with self.subTest(proto):
                self.assertTrue(c.is_model_ready("affine"))
                self.assertTrue(c.is_model_ready("affine", "1"))
                self.assertFalse(c.is_model_ready("affine", "9"))
                self.assertFalse(c.is_model_ready("no_such_model"))
                meta = c.get_model_metadata("affine", as_json=True) if proto == "grpc" \
                    else c.get_model_metadata("affine")
                self.assertEqual(meta["name"], "affine")
                self.assertEqual(meta["versions"], ["1"])
                self.assertEqual(meta["platform"], "pytorch_libtorch")
                inp, out = meta["inputs"][0], meta["outputs"][0]
                self.assertEqual((inp["name"], inp["datatype"]), ("x", "FP32"))
                self.assertEqual([int(d) for d in inp["shape"]], [-1, 4])
                self.assertEqual((out["name"], out["datatype"]), ("y", "FP32"))
                self.assertEqual([int(d) for d in out["shape"]], [-1, 3])
                config = c.get_model_config("affine", as_json=True)["config"] \
                    if proto == "grpc" else c.get_model_config("affine")
                self.assertEqual(config["name"], "affine")
                self.assertEqual(int(config["max_batch_size"]), 8)
                self.assertEqual(config["input"][0]["data_type"], "TYPE_FP32")
                self.assertEqual([int(d) for d in config["input"][0]["dims"]], [4])
                self.assertEqual(config["instance_group"][0]["kind"], "KIND_CPU")


class Infer(unittest.TestCase):
    def test_fp32_over_both_protocols_and_encodings(self):
        expected = affine(ROWS)
        for proto, mod, c in clients():
            for binary in ((True, False) if proto == "http" else (True,)):
                with self.subTest(proto=proto, binary=binary):
                    x = mod.InferInput("x", list(ROWS.shape), "FP32")
                    if proto == "http":
                        x.set_data_from_numpy(ROWS, binary_data=binary)
                        y = mod.InferRequestedOutput("y", binary_data=binary)
                    else:
                        x.set_data_from_numpy(ROWS)
                        y = mod.InferRequestedOutput("y")
                    result = c.infer("affine", [x], outputs=[y], request_id="r7")
                    np.testing.assert_array_equal(result.as_numpy("y"), expected)
                    response = result.get_response()
                    rid = response.id if proto == "grpc" else response["id"]
                    self.assertEqual(rid, "r7")

    def test_int64(self):
        values = np.array([1, -2, 3, 1 << 40], dtype=np.int64)
        for proto, mod, c in clients():
            with self.subTest(proto):
                x = mod.InferInput("x", [4], "INT64")
                x.set_data_from_numpy(values)
                result = c.infer("double_i64", [x])
                out = result.as_numpy("y")
                self.assertEqual(out.dtype, np.int64)
                np.testing.assert_array_equal(out, values * 2)

    def test_bytes_through_a_plugin(self):
        text = np.array([b"hello", "hi there, world".encode(), b""], dtype=np.object_)
        for proto, mod, c in clients():
            for binary in ((True, False) if proto == "http" else (True,)):
                with self.subTest(proto=proto, binary=binary):
                    x = mod.InferInput("text", [3], "BYTES")
                    if proto == "http":
                        x.set_data_from_numpy(text, binary_data=binary)
                    else:
                        x.set_data_from_numpy(text)
                    out = c.infer("text_len", [x]).as_numpy("length")
                    np.testing.assert_array_equal(out, [[5], [8], [0]])

    def test_json_input_binary_output_and_version(self):
        # JSON in, binary out, explicit version: the encodings mix freely.
        c = httpclient.InferenceServerClient(url=HTTP)
        x = httpclient.InferInput("x", [3], "FP32")
        x.set_data_from_numpy(np.array([0.5, -1, 8], dtype=np.float32), binary_data=False)
        y = httpclient.InferRequestedOutput("y", binary_data=True)
        result = c.infer("scale", [x], outputs=[y], model_version="1")
        np.testing.assert_array_equal(result.as_numpy("y"), [1, -2, 16])

    def test_classification(self):
        expected = affine(ROWS)
        want = []
        for row in expected:
            order = sorted(range(3), key=lambda i: -row[i])[:2]
            want.append([f"{row[i]:.6f}:{i}" for i in order])
        for proto, mod, c in clients():
            with self.subTest(proto):
                x = mod.InferInput("x", list(ROWS.shape), "FP32")
                x.set_data_from_numpy(ROWS)
                y = mod.InferRequestedOutput("y", class_count=2)
                out = c.infer("affine", [x], outputs=[y]).as_numpy("y")
                got = [[e.decode() if isinstance(e, bytes) else e for e in row] for row in out]
                self.assertEqual(got, want)

    def test_streaming_in_order_with_an_error_in_band(self):
        c = grpcclient.InferenceServerClient(url=GRPC)
        results = queue.Queue()
        c.start_stream(callback=lambda result, error: results.put((result, error)))
        for i in range(12):
            # Request 5 carries the wrong datatype: answered in band, in order.
            dtype = np.int32 if i == 5 else np.float32
            x = grpcclient.InferInput("x", [1], "INT32" if i == 5 else "FP32")
            x.set_data_from_numpy(np.full([1], i, dtype=dtype))
            c.async_stream_infer("scale", [x], request_id=str(i))
        c.stop_stream()
        for i in range(12):
            result, error = results.get(timeout=60)
            if i == 5:
                self.assertIsNotNone(error)
                self.assertIn("input 'x': expected dtype f32, got i32", error.message())
            else:
                self.assertIsNone(error, error)
                self.assertEqual(result.get_response().id, str(i))
                np.testing.assert_array_equal(result.as_numpy("y"), [2 * i])


class Repository(unittest.TestCase):
    def index(self, proto, c):
        if proto == "grpc":
            rows = c.get_model_repository_index(as_json=True).get("models", [])
        else:
            rows = c.get_model_repository_index()
        return {r["name"]: r for r in rows}

    def test_load_unload_and_index(self):
        for proto, mod, c in clients():
            with self.subTest(proto):
                index = self.index(proto, c)
                self.assertEqual(index["scale"]["state"], "READY")
                self.assertEqual(index["scale"]["version"], "1")
                c.unload_model("scale")
                self.assertFalse(c.is_model_ready("scale"))
                self.assertEqual(self.index(proto, c)["scale"]["state"], "UNAVAILABLE")
                with self.assertRaises(InferenceServerException) as ctx:
                    x = mod.InferInput("x", [1], "FP32")
                    x.set_data_from_numpy(np.ones(1, dtype=np.float32))
                    c.infer("scale", [x])
                self.assertIn("UNAVAILABLE", ctx.exception.message())
                c.load_model("scale")
                self.assertTrue(c.is_model_ready("scale"))
                # Loading a ready model reloads it, as Triton does.
                c.load_model("scale")
                self.assertTrue(c.is_model_ready("scale"))
                self.assertEqual(self.index(proto, c)["scale"]["state"], "READY")
                with self.assertRaises(InferenceServerException) as ctx:
                    c.load_model("no_such_model")
                self.assertIn("no_such_model", ctx.exception.message())


class Statistics(unittest.TestCase):
    def test_success_and_failure_counts(self):
        g = grpcclient.InferenceServerClient(url=GRPC)
        h = httpclient.InferenceServerClient(url=HTTP)

        def counts():
            s = g.get_inference_statistics("double_i64").model_stats[0]
            return (s.inference_stats.success.count, s.inference_stats.fail.count,
                    s.inference_stats.compute_infer.count, s.inference_count)

        before = counts()
        for _ in range(3):
            x = grpcclient.InferInput("x", [2], "INT64")
            x.set_data_from_numpy(np.array([1, 2], dtype=np.int64))
            g.infer("double_i64", [x])
        x = grpcclient.InferInput("x", [2], "INT32")
        x.set_data_from_numpy(np.array([1, 2], dtype=np.int32))
        with self.assertRaises(InferenceServerException):
            g.infer("double_i64", [x])
        after = counts()
        self.assertEqual(after[0] - before[0], 3)
        self.assertEqual(after[1] - before[1], 1)
        self.assertEqual(after[2] - before[2], 3)
        self.assertEqual(after[3] - before[3], 3)
        stats = h.get_inference_statistics("double_i64")["model_stats"][0]
        self.assertEqual(stats["name"], "double_i64")
        self.assertEqual(stats["inference_stats"]["success"]["count"], after[0])
        self.assertGreater(stats["inference_stats"]["compute_infer"]["ns"], 0)
        names = {s["name"] for s in h.get_inference_statistics()["model_stats"]}
        self.assertTrue({"affine", "double_i64"} <= names)


class Errors(unittest.TestCase):
    def expect(self, proto, call, status, *needles):
        with self.assertRaises(InferenceServerException) as ctx:
            call()
        err = ctx.exception
        self.assertEqual(err.status(), status[proto], err)
        for needle in needles:
            self.assertIn(needle, err.message())

    def test_unknown_model(self):
        for proto, mod, c in clients():
            x = mod.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
            self.expect(proto, lambda: c.infer("no_such_model", [x]),
                        {"grpc": "StatusCode.NOT_FOUND", "http": "404"}, "no_such_model")

    def test_wrong_shape_datatype_and_missing_input(self):
        invalid = {"grpc": "StatusCode.INVALID_ARGUMENT", "http": "400"}
        for proto, mod, c in clients():
            with self.subTest(proto):
                x = mod.InferInput("x", [1, 5], "FP32")
                x.set_data_from_numpy(np.ones((1, 5), dtype=np.float32))
                self.expect(proto, lambda: c.infer("affine", [x]), invalid,
                            "input 'x'", "expected shape [-1, 4], got [1, 5]")
                x = mod.InferInput("x", [1, 4], "FP64")
                x.set_data_from_numpy(np.ones((1, 4), dtype=np.float64))
                self.expect(proto, lambda: c.infer("affine", [x]), invalid,
                            "input 'x'", "expected dtype f32, got f64")
                w = mod.InferInput("w", [1, 4], "FP32")
                w.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
                self.expect(proto, lambda: c.infer("affine", [w]), invalid, "unexpected input 'w'")
                self.expect(proto, lambda: c.infer("affine", []), invalid, "missing input 'x'")
                # BYTES decodes (length-prefixed) and is refused by a model that takes FP32.
                s = mod.InferInput("x", [1, 4], "BYTES")
                s.set_data_from_numpy(np.array([[b"a", b"bc", b"", b"d"]], dtype=np.object_))
                self.expect(proto, lambda: c.infer("affine", [s]), invalid,
                            "input 'x'", "expected dtype f32, got bytes")

    def test_malformed_rest_requests(self):
        cases = [
            (b"{not json", {}, "not valid JSON"),
            (b"[]", {}, "must be a JSON object"),
            (b'{"inputs": 3}', {}, "field 'inputs' must be an array"),
            (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4],
                                     "data": [1, 2, 3, 4]}]}).encode(), {},
             "tensor 'x': dimension 0 of shape [-1, 4] is negative"),
            (json.dumps({"inputs": [{"name": "x", "datatype": "FP32",
                                     "shape": [1 << 40, 1 << 20], "data": [1]}]}).encode(), {},
             "tensor 'x'"),
            (json.dumps({"inputs": [{"name": "x", "datatype": "FP33", "shape": [1, 4],
                                     "data": [1, 2, 3, 4]}]}).encode(), {},
             "unknown datatype \"FP33\""),
            (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                     "data": [1, 2, 3]}]}).encode(), {},
             "tensor 'x': shape [1, 4] needs 4 elements, got 3"),
            (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                     "data": [1, 2, 3, "four"]}]}).encode(), {},
             "element 3 (\"four\") is not a FP32 value"),
        ]
        head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                       "data": [1, 2, 3, 4],
                                       "parameters": {"binary_data_size": 16}}]}).encode()
        cases.append((head + bytes(16), {"Inference-Header-Content-Length": str(len(head))},
                      "both 'data' and parameter 'binary_data_size'"))
        head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                       "parameters": {"binary_data_size": 16}}]}).encode()
        cases.append((head + bytes(8), {"Inference-Header-Content-Length": str(len(head))},
                      "binary_data_size is 16 but only 8 bytes"))
        cases.append((head + bytes(20), {"Inference-Header-Content-Length": str(len(head))},
                      "4 bytes of binary data after the JSON are not claimed"))
        head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4],
                                       "parameters": {"binary_data_size": 16}}]}).encode()
        cases.append((head + bytes(16), {"Inference-Header-Content-Length": str(len(head))},
                      "tensor 'x': shape [2, 4] of f32 needs 32 bytes, got 16"))
        for body, headers, needle in cases:
            with self.subTest(needle):
                status, answer = post("/v2/models/affine/infer", body, headers)
                self.assertEqual(status, 400, answer)
                self.assertIn(needle, answer["error"])
        # A binary request done right works, and so does the server after all that.
        head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                       "parameters": {"binary_data_size": 16}}]}).encode()
        status, answer = post("/v2/models/affine/infer",
                              head + ROWS[0].tobytes(),
                              {"Inference-Header-Content-Length": str(len(head))})
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(answer)["outputs"][0]["data"], affine(ROWS[:1]).ravel().tolist())

    def test_rest_status_codes(self):
        self.assertEqual(get("/v2/models/no_such_model")[0], 404)
        self.assertEqual(get("/v2/models/no_such_model/ready")[0], 404)
        self.assertEqual(get("/v2/models/affine/versions/9")[0], 404)
        status, answer = get("/v2/nothing/here")
        self.assertEqual(status, 404)
        self.assertIn("error", answer)
        status, answer = post("/v2/repository/index", b'{"ready": "yes"}')
        self.assertEqual(status, 400)
        self.assertIn("'ready'", answer["error"])


if __name__ == "__main__":
    unittest.main(verbosity=2)
