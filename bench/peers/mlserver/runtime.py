"""Custom MLServer runtime for the benchmark's "double" model: y = 2 * x (FP32)."""
import numpy as np

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput


class DoubleModel(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        y = (x * np.float32(2.0)).reshape(-1)
        # Built by hand: NumpyCodec.encode_output would report a 1-D array as
        # shape [N, 1] (it assumes a leading batch dimension).
        out = ResponseOutput(name="y", datatype="FP32", shape=[y.size], data=y.tolist())
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=[out])
