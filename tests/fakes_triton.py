"""A stand-in for ``triton_python_backend_utils``: NOT Triton, just its Python-side API shapes.

It lets the Python-backend models' request handling run in-process: tensors, requests,
responses, errors, and BLS calls (``InferenceRequest.exec``) dispatched to in-process models,
so the BLS pipeline can be tested without a server that has the onnxruntime backend.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class TritonError:
    INVALID_ARG = 3
    INTERNAL = 13

    def __init__(self, msg: str, code: int | None = None) -> None:
        self._msg, self.code = msg, code

    def message(self) -> str:
        return self._msg


class InferenceResponse:
    def __init__(self, output_tensors: Sequence[Tensor], error: TritonError | None = None,
                 parameters: dict | None = None) -> None:
        self.output_tensors, self._error, self.parameters = list(output_tensors), error, parameters

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class Request:
    """An incoming request (what Triton hands ``execute``)."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = list(tensors)


def get_input_tensor_by_name(request: Request, name: str) -> Tensor | None:
    return next((t for t in request.tensors if t.name() == name), None)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors if t.name() == name), None)


class FakePb:
    """The module object handed to the models as ``pb``; BLS calls go to ``models[name]``."""

    Tensor = Tensor
    TritonError = TritonError
    InferenceResponse = InferenceResponse
    get_input_tensor_by_name = staticmethod(get_input_tensor_by_name)
    get_output_tensor_by_name = staticmethod(get_output_tensor_by_name)

    def __init__(self) -> None:
        self.models: dict[str, Callable[[list[Request]], list[InferenceResponse]]] = {}
        self.calls: list[str] = []
        pb = self

        class InferenceRequest:
            def __init__(self, model_name: str, requested_output_names: Sequence[str],
                         inputs: Sequence[Tensor], **_: Any) -> None:
                self.model_name, self.names, self.inputs = model_name, list(requested_output_names), list(inputs)

            def exec(self) -> InferenceResponse:
                pb.calls.append(self.model_name)
                if self.model_name not in pb.models:
                    return InferenceResponse([], TritonError(f"model {self.model_name} not loaded"))
                return pb.models[self.model_name]([Request(self.inputs)])[0]

        self.InferenceRequest = InferenceRequest
