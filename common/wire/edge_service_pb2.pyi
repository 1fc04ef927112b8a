from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("name", "shape", "dtype", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("device_id", "model_id", "model_version", "epoch")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    model_id: str
    model_version: str
    epoch: str
    def __init__(self, device_id: _Optional[str] = ..., model_id: _Optional[str] = ..., model_version: _Optional[str] = ..., epoch: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("params_version", "norm_param_names", "max_batch_samples", "last_batch_id")
    PARAMS_VERSION_FIELD_NUMBER: _ClassVar[int]
    NORM_PARAM_NAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LAST_BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    params_version: int
    norm_param_names: _containers.RepeatedScalarFieldContainer[str]
    max_batch_samples: int
    last_batch_id: int
    def __init__(self, params_version: _Optional[int] = ..., norm_param_names: _Optional[_Iterable[str]] = ..., max_batch_samples: _Optional[int] = ..., last_batch_id: _Optional[int] = ...) -> None: ...

class SampleBatch(_message.Message):
    __slots__ = ("device_id", "batch_id", "inputs", "entropies", "epoch", "stream_seen")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ENTROPIES_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STREAM_SEEN_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    batch_id: int
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    entropies: _containers.RepeatedScalarFieldContainer[float]
    epoch: str
    stream_seen: int
    def __init__(self, device_id: _Optional[str] = ..., batch_id: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., entropies: _Optional[_Iterable[float]] = ..., epoch: _Optional[str] = ..., stream_seen: _Optional[int] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("accepted", "total_accepted", "last_batch_id", "params_version", "resent")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    LAST_BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESENT_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    total_accepted: int
    last_batch_id: int
    params_version: int
    resent: int
    def __init__(self, accepted: _Optional[int] = ..., total_accepted: _Optional[int] = ..., last_batch_id: _Optional[int] = ..., params_version: _Optional[int] = ..., resent: _Optional[int] = ...) -> None: ...

class NormParamsRequest(_message.Message):
    __slots__ = ("device_id", "known_version")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    KNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    known_version: int
    def __init__(self, device_id: _Optional[str] = ..., known_version: _Optional[int] = ...) -> None: ...

class NormParams(_message.Message):
    __slots__ = ("version", "params")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    version: int
    params: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, version: _Optional[int] = ..., params: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...
