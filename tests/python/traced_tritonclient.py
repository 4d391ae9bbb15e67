"""tritonclient (gRPC and HTTP) sending requests with a W3C `traceparent`.

One request per client to the `img` model (a u8 HWC image through a
preprocess plugin, the model and a postprocess plugin), each carrying the
trace id the test gives it (PLINTH_TRACE_GRPC, PLINTH_TRACE_HTTP) and the
parent span id PLINTH_PARENT_SPAN. Prints each answer, which the test checks,
then the test checks the spans its OTLP collector received.
"""

import os
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

PIXELS = np.array([[p, 10 + p, 20 + p] for p in range(1, 5)], dtype=np.uint8).reshape(2, 2, 3)


def ask(module, client, trace_id):
    image = module.InferInput("image", [2, 2, 3], "UINT8")
    image.set_data_from_numpy(PIXELS)
    outputs = [module.InferRequestedOutput("topk_indices"), module.InferRequestedOutput("topk_scores")]
    traceparent = f"00-{trace_id}-{os.environ['PLINTH_PARENT_SPAN']}-01"
    result = client.infer(
        "img",
        [image],
        outputs=outputs,
        request_id=f"traced-{trace_id[:8]}",
        headers={"traceparent": traceparent, "tracestate": "plinth-test=1"},
    )
    indices = result.as_numpy("topk_indices").tolist()
    scores = result.as_numpy("topk_scores").tolist()
    print(f"{module.__name__} indices={indices} scores={scores}")


def main():
    ask(grpcclient, grpcclient.InferenceServerClient(os.environ["PLINTH_GRPC"]), os.environ["PLINTH_TRACE_GRPC"])
    ask(httpclient, httpclient.InferenceServerClient(os.environ["PLINTH_HTTP"]), os.environ["PLINTH_TRACE_HTTP"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
