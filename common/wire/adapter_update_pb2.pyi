from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    DENSE_FP32: _ClassVar[Encoding]
    DENSE_FP16: _ClassVar[Encoding]
    TERNARY_SPARSE: _ClassVar[Encoding]

class PositionCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POSITION_CODE_UNSPECIFIED: _ClassVar[PositionCode]
    RICE_GAPS: _ClassVar[PositionCode]
ENCODING_UNSPECIFIED: Encoding
DENSE_FP32: Encoding
DENSE_FP16: Encoding
TERNARY_SPARSE: Encoding
POSITION_CODE_UNSPECIFIED: PositionCode
RICE_GAPS: PositionCode

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Block(_message.Message):
    __slots__ = ("encoding", "scale", "num_kept", "position_code", "rice_k", "payload", "signs")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    NUM_KEPT_FIELD_NUMBER: _ClassVar[int]
    POSITION_CODE_FIELD_NUMBER: _ClassVar[int]
    RICE_K_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SIGNS_FIELD_NUMBER: _ClassVar[int]
    encoding: Encoding
    scale: float
    num_kept: int
    position_code: PositionCode
    rice_k: int
    payload: bytes
    signs: bytes
    def __init__(self, encoding: _Optional[_Union[Encoding, str]] = ..., scale: _Optional[float] = ..., num_kept: _Optional[int] = ..., position_code: _Optional[_Union[PositionCode, str]] = ..., rice_k: _Optional[int] = ..., payload: _Optional[bytes] = ..., signs: _Optional[bytes] = ...) -> None: ...

class AdapterUpdate(_message.Message):
    __slots__ = ("format_version", "round", "num_examples", "checksum", "layout", "tensors", "blocks")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    round: int
    num_examples: int
    checksum: int
    layout: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    blocks: _containers.RepeatedCompositeFieldContainer[Block]
    def __init__(self, format_version: _Optional[int] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., checksum: _Optional[int] = ..., layout: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., blocks: _Optional[_Iterable[_Union[Block, _Mapping]]] = ...) -> None: ...
