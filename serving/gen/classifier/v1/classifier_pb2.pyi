from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("image", "top_k", "tta", "model", "version")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TTA_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    top_k: int
    tta: bool
    model: str
    version: int
    def __init__(self, image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., tta: _Optional[bool] = ..., model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "index", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    index: int
    probability: float
    def __init__(self, label: _Optional[str] = ..., index: _Optional[int] = ..., probability: _Optional[float] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "probabilities", "model_name", "model_version", "tta_views")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TTA_VIEWS_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    model_name: str
    model_version: str
    tta_views: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., probabilities: _Optional[_Iterable[float]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., tta_views: _Optional[_Iterable[str]] = ...) -> None: ...

class PredictBatchRequest(_message.Message):
    __slots__ = ("requests", "model", "version")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[PredictRequest]
    model: str
    version: int
    def __init__(self, requests: _Optional[_Iterable[_Union[PredictRequest, _Mapping]]] = ..., model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class PredictBatchResult(_message.Message):
    __slots__ = ("status", "response")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    status: Status
    response: PredictResponse
    def __init__(self, status: _Optional[_Union[Status, _Mapping]] = ..., response: _Optional[_Union[PredictResponse, _Mapping]] = ...) -> None: ...

class PredictBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PredictBatchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[PredictBatchResult, _Mapping]]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "architecture", "classes", "input_size", "tta_views", "metrics", "model_sha256", "schema_version", "precision", "providers", "tta_default", "tta_reason", "metrics_held_out", "bundle_version")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    TTA_VIEWS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    TTA_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    TTA_REASON_FIELD_NUMBER: _ClassVar[int]
    METRICS_HELD_OUT_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    architecture: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    input_size: int
    tta_views: _containers.RepeatedScalarFieldContainer[str]
    metrics: _containers.ScalarMap[str, float]
    model_sha256: str
    schema_version: int
    precision: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    tta_default: bool
    tta_reason: str
    metrics_held_out: bool
    bundle_version: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., architecture: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., input_size: _Optional[int] = ..., tta_views: _Optional[_Iterable[str]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., model_sha256: _Optional[str] = ..., schema_version: _Optional[int] = ..., precision: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., tta_default: _Optional[bool] = ..., tta_reason: _Optional[str] = ..., metrics_held_out: _Optional[bool] = ..., bundle_version: _Optional[str] = ...) -> None: ...
