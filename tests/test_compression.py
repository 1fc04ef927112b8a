"""ComPEFT codec: round trips against a reference, size vs the entropy bound, hostile payloads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.compression import PayloadError, compress, decompress, kept_count, read_header
from common.compression import golomb
from common.compression.codec import _checksum, _kth_largest
from common.wire import adapter_update_pb2 as pb


def lora_adapter(pairs: int, rank: int = 16, dim: int = 768, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(pairs):
        out[f"layers.{i}.lora_A"] = torch.randn(rank, dim, generator=g)
        out[f"layers.{i}.lora_B"] = torch.randn(dim, rank, generator=g)
    return out


def reference_compeft(tensors, density: float, alpha: float = 1.0, scope: str = "global"):
    """ComPEFT in a few lines of torch: top-k mask, alpha * sigma * sign."""
    groups = [[name] for name in tensors] if scope == "tensor" else [list(tensors)]
    out = {}
    for names in groups:
        flat = torch.cat([tensors[n].flatten() for n in names])
        k = max(1, math.floor(density * flat.numel() + 0.5))
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[flat.abs().topk(k).indices] = True
        scale = torch.tensor(alpha * flat.double().std(correction=0).item(), dtype=torch.float32)
        dense = torch.where(mask, scale * torch.sign(flat), torch.zeros(()))
        for piece, n in zip(dense.split([tensors[n].numel() for n in names]), names):
            out[n] = piece.reshape(tensors[n].shape)
    return out


def entropy_bound(k: float) -> float:
    """Bits per entry a ternary vector of density k needs: H(k) + k."""
    if k >= 1:
        return 1.0
    return -(k * math.log2(k) + (1 - k) * math.log2(1 - k)) + k


def resign(message: pb.AdapterUpdate) -> bytes:
    message.checksum = _checksum(message)
    return message.SerializeToString()


def parsed(payload: bytes) -> pb.AdapterUpdate:
    message = pb.AdapterUpdate()
    message.ParseFromString(payload)
    return message


SMALL = lora_adapter(2, rank=4, dim=32, seed=1)  # 4 tensors of 128 elements
SMALL_SHAPES = {name: tuple(t.shape) for name, t in SMALL.items()}


# --------------------------------------------------------------------------- round trips


def test_density_one_is_lossless_fp32():
    tensors = {"a": torch.randn(7, 5), "scalar": torch.tensor(3.5), "cube": torch.randn(2, 3, 4)}
    out = decompress(compress(tensors, density=1.0))
    assert list(out) == list(tensors)
    for name, t in tensors.items():
        assert out[name].dtype == torch.float32 and torch.equal(out[name], t)


def test_dense_fp16_within_fp16_tolerance():
    tensors = {"a": torch.randn(64, 8), "b": torch.randn(3) * 100}
    payload = compress(tensors, density=1.0, encoding_dense="fp16")
    assert read_header(payload).tensors["a"].encoding == "DENSE_FP16"
    for name, t in decompress(payload).items():
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, tensors[name], rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="float16 range"):
        compress({"a": torch.tensor([1e6])}, density=1.0, encoding_dense="fp16")


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("density,alpha", [(0.01, 1.0), (0.1, 1.0), (0.37, 2.5)])
def test_matches_reference_compeft(density, alpha, scope):
    tensors = lora_adapter(3, rank=8, dim=256, seed=2)
    tensors["head.bias"] = torch.randn(10) * 5
    out = decompress(compress(tensors, density=density, alpha=alpha, scope=scope))
    ref = reference_compeft(tensors, density, alpha, scope)
    for name in tensors:
        assert torch.equal(out[name], ref[name]), name


def test_accepts_other_float_dtypes_and_grad_tensors():
    tensors = {"h": torch.randn(50, dtype=torch.float16), "b": torch.randn(50, dtype=torch.bfloat16),
               "g": torch.randn(50, requires_grad=True)}
    out = decompress(compress(tensors, density=1.0))
    for name, t in tensors.items():
        assert torch.equal(out[name], t.detach().float())


def test_kept_count_rounds_half_up_and_keeps_at_least_one():
    assert kept_count(1000, 0.0125) == 13  # 12.5 rounds up
    assert kept_count(1000, 0.0124) == 12
    assert kept_count(10, 0.01) == 1
    assert kept_count(7, 1.0) == 7
    tensors = lora_adapter(2, rank=4, dim=100, seed=3)
    n = sum(t.numel() for t in tensors.values())
    header = read_header(compress(tensors, density=0.123))
    assert sum(info.num_kept for info in header.tensors.values()) == kept_count(n, 0.123)
    header = read_header(compress(tensors, density=0.123, scope="tensor"))
    for name, info in header.tensors.items():
        assert info.num_kept == kept_count(tensors[name].numel(), 0.123)


def test_global_scope_shares_one_topk_and_sigma_tensor_scope_does_not():
    g = torch.Generator().manual_seed(4)
    tensors = {"small": torch.randn(1000, generator=g), "large": 10 * torch.randn(1000, generator=g)}
    glob = parsed(compress(tensors, density=0.1))
    per = parsed(compress(tensors, density=0.1, scope="tensor"))
    kept_global = {t.name: t.num_kept for t in glob.tensors}
    assert kept_global["large"] > 190 and kept_global["small"] < 10  # top-k lands on the large tensor
    assert glob.tensors[0].scale == glob.tensors[1].scale
    assert [t.num_kept for t in per.tensors] == [100, 100]
    assert per.tensors[1].scale > 5 * per.tensors[0].scale


def test_ties_keep_the_lowest_index_and_zeros_are_never_kept():
    out = decompress(compress({"t": torch.tensor([1.0, -2.0, 2.0, 2.0, 0.5])}, density=0.4))["t"]
    s = torch.tensor([1.0, -2.0, 2.0, 2.0, 0.5]).double().std(correction=0).float()
    assert torch.equal(out, torch.stack([torch.tensor(0.0), -s, s, torch.tensor(0.0), torch.tensor(0.0)]))
    payload = compress({"z": torch.tensor([0.0, 0.0, 3.0, 0.0])}, density=0.75)
    assert read_header(payload).tensors["z"].num_kept == 1
    assert decompress(payload)["z"].count_nonzero() == 1


def test_header_is_readable_without_decoding():
    payload = compress(SMALL, density=0.25, round=7, num_examples=1234)
    header = read_header(payload, expected=SMALL_SHAPES)
    assert (header.round, header.num_examples) == (7, 1234)
    assert {n: i.shape for n, i in header.tensors.items()} == SMALL_SHAPES
    assert all(i.encoding == "TERNARY_SPARSE" for i in header.tensors.values())


# --------------------------------------------------------------------------- size


@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.2, 0.5])
def test_size_near_entropy_bound(density):
    tensors = lora_adapter(41, seed=5)  # 82 tensors, ~1.0 M Gaussian parameters
    n = sum(t.numel() for t in tensors.values())
    payload = compress(tensors, density=density)
    header_allowance_bits = 8 * (32 + 64 * len(tensors))
    assert len(payload) * 8 <= 1.10 * entropy_bound(density) * n + header_allowance_bits
    body = sum(len(t.payload) + len(t.signs) for t in parsed(payload).tensors)
    assert body * 8 <= 1.10 * entropy_bound(density) * n


def test_rice_parameter_is_near_optimal_and_never_worse_than_a_bitmask():
    rng = np.random.default_rng(6)
    for density in [0.01, 0.1, 0.5, 0.9]:
        positions = np.flatnonzero(rng.random(10_000) < density)
        gaps = golomb.gaps_of(positions)
        k, data = golomb.encode(positions)
        assert golomb.rice_bits(gaps, k) == min(golomb.rice_bits(gaps, j) for j in range(15))
        assert len(data) <= (10_000 + 7) // 8  # a bitmask's size


def test_kth_largest_is_exact_on_awkward_data():
    rng = np.random.default_rng(7)
    n = 300_000  # large enough for the sampled path
    cases = [np.abs(rng.standard_normal(n)).astype(np.float32), np.zeros(n, np.float32),
             np.sort(rng.random(n)).astype(np.float32), np.repeat(np.arange(6, dtype=np.float32), n // 6),
             np.concatenate([np.zeros(n - 500, np.float32), rng.random(500).astype(np.float32)])]
    for values in cases:
        for k in [1, 9, n // 100, n // 2, n]:
            assert _kth_largest(values, k) == np.partition(values, n - k)[n - k]


@pytest.mark.parametrize("numel", [1, 2, 9, 1000])
def test_rice_code_round_trips_edge_sets(numel):
    rng = np.random.default_rng(numel)
    sets = [np.array([], np.int64), np.arange(numel), np.array([0]), np.array([numel - 1]),
            np.sort(rng.choice(numel, size=max(1, numel // 3), replace=False))]
    for positions in sets:
        for k in range(0, numel.bit_length() + 1):
            data = golomb.rice_encode(golomb.gaps_of(positions), k)
            assert np.array_equal(golomb.decode(data, positions.size, numel, k), positions)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("kwargs,match", [
    ({"density": 0.0}, "density"), ({"density": 1.5}, "density"), ({"density": float("nan")}, "density"),
    ({"density": True}, "density"), ({"density": 0.1, "alpha": 0.0}, "alpha"),
    ({"density": 0.1, "alpha": -1.0}, "alpha"), ({"density": 0.1, "alpha": float("inf")}, "alpha"),
    ({"density": 0.1, "scope": "layer"}, "scope"), ({"density": 1.0, "encoding_dense": "int8"}, "encoding"),
    ({"density": 0.1, "round": -1}, "round"),
])
def test_compress_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compress(SMALL, **kwargs)


@pytest.mark.parametrize("tensors,match", [
    ({}, "non-empty"),
    ({"a": torch.arange(4)}, "floating-point"),
    ({"a": np.zeros(3)}, "floating-point"),
    ({"a": torch.tensor([1.0, float("nan")])}, "non-finite"),
    ({"a": torch.tensor([1.0, float("inf")])}, "non-finite"),
    ({"a": torch.zeros(0, 4)}, "elements"),
    ({"": torch.zeros(2)}, "names"),
])
def test_compress_rejects_bad_tensors(tensors, match):
    with pytest.raises(ValueError, match=match):
        compress(tensors, density=0.5)


def test_compress_rejects_scale_overflow():
    with pytest.raises(ValueError, match="overflows"):
        compress({"a": torch.tensor([3e38, -3e38, 0.0])}, density=0.5, alpha=1e10)


# --------------------------------------------------------------------------- hostile payloads


def _set(field, value):
    def mutate(m):
        setattr(m.tensors[0], field, value)
    return mutate


def _set_shape(shape):
    def mutate(m):
        del m.tensors[0].shape[:]
        m.tensors[0].shape.extend(shape)
    return mutate


def _out_of_range_positions(m):
    t = m.tensors[0]  # 128 elements; three gaps of 60 -> positions 60, 121, 182
    t.position_code, t.rice_k, t.num_kept = pb.RICE_GAPS, 6, 3
    t.payload = golomb.rice_encode(np.array([60, 60, 60]), 6)
    t.signs = b"\x00"


def _more_gap_codes_than_declared(m):
    t = m.tensors[0]
    t.rice_k = 0
    t.payload = golomb.rice_encode(np.zeros(t.num_kept + 1, np.int64), 0)


def _drop_tensors(m):
    del m.tensors[:]


def _duplicate_name(m):
    m.tensors[1].name = m.tensors[0].name


def _dense_nan(m):
    m.tensors[0].payload = np.full(128, np.nan, "<f4").tobytes()


@pytest.mark.parametrize("density,mutate,match", [
    (0.1, lambda m: setattr(m, "format_version", 2), "unsupported format_version 2"),
    (0.1, _set_shape([-4, 32]), "invalid shape"),
    (0.1, _set_shape([2**31, 2**31]), "more than 1073741824 elements"),
    (0.1, _set_shape([2**14, 2**15]), "max_elements=268435456"),
    (0.1, _set_shape([1] * 9), "dimensions"),
    (0.1, _set("num_kept", 129), "num_kept 129 exceeds"),
    (0.1, _set("num_kept", 2**63), "exceeds"),
    (0.1, _out_of_range_positions, "position 182 out of range for 128 elements"),
    (0.1, _more_gap_codes_than_declared, "gap codes, header says"),
    (0.1, _set("scale", float("nan")), "scale must be finite"),
    (0.1, _set("scale", float("inf")), "scale must be finite"),
    (0.1, _set("scale", -1.0), "scale must be finite and >= 0"),
    (0.1, _set("signs", b""), "sign bits"),
    (0.1, _set("payload", b"\xff" * 40), "position data|gap codes|trailing"),
    (0.1, _set("rice_k", 40), "rice_k 40 out of range"),
    (0.1, _set("position_code", 2), "unknown position_code"),
    (0.1, _set("encoding", 9), "unknown encoding"),
    (0.1, _set("name", ""), "empty name|names differ"),
    (0.1, _drop_tensors, "no tensors"),
    (0.1, _duplicate_name, "duplicate"),
    (1.0, _set("payload", b"\x00" * 12), "dense payload is 12 bytes"),
    (1.0, _set("num_kept", 3), "dense tensor declares num_kept"),
    (1.0, _set("scale", 1.0), "sparse-encoding fields"),
    (1.0, _dense_nan, "NaN or infinity"),
])
def test_malformed_but_signed_payloads_raise_payload_error(density, mutate, match):
    message = parsed(compress(SMALL, density=density))
    mutate(message)
    with pytest.raises(PayloadError, match=match):
        decompress(resign(message))


def test_corrupted_or_foreign_bytes_raise_payload_error():
    payload = compress(SMALL, density=0.1)
    flipped = bytearray(payload)
    flipped[len(flipped) // 2] ^= 0x10
    with pytest.raises(PayloadError, match="checksum mismatch|not a valid"):
        decompress(bytes(flipped))
    with pytest.raises(PayloadError, match="not a valid"):
        decompress(payload[:-7])
    with pytest.raises(PayloadError, match="not a valid"):
        decompress(b"\xff" * 64)
    with pytest.raises(PayloadError, match="format_version 0"):
        decompress(b"")
    with pytest.raises(PayloadError, match="must be bytes"):
        decompress("not bytes")  # type: ignore[arg-type]
    message = parsed(payload)
    message.checksum ^= 1
    with pytest.raises(PayloadError, match="checksum mismatch"):
        decompress(message.SerializeToString())


def test_expected_names_shapes_and_element_bound_are_enforced():
    payload = compress(SMALL, density=0.1)
    assert set(decompress(payload, expected=SMALL_SHAPES)) == set(SMALL)
    with pytest.raises(PayloadError, match="missing .*layers.9.lora_A"):
        decompress(payload, expected={**SMALL_SHAPES, "layers.9.lora_A": (4, 32)})
    with pytest.raises(PayloadError, match="unexpected"):
        decompress(payload, expected={n: s for n, s in list(SMALL_SHAPES.items())[1:]})
    with pytest.raises(PayloadError, match=r"differs from expected \(32, 4\)"):
        decompress(payload, expected={n: s[::-1] for n, s in SMALL_SHAPES.items()})
    with pytest.raises(PayloadError, match="max_elements=100"):
        decompress(payload, max_elements=100)


# A valid payload of each kind: sparse (Rice parameter > 0 and = 0), dense fp16.
BASES = [compress(SMALL, density=0.1), compress(SMALL, density=0.5), compress(SMALL, density=1.0, encoding_dense="fp16")]


def _check_outcome(payload: bytes, **kwargs) -> None:
    try:
        out = decompress(payload, **kwargs)
    except PayloadError:
        return
    if "expected" in kwargs:
        assert {n: tuple(t.shape) for n, t in out.items()} == SMALL_SHAPES
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in out.values())


_edits = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, len(BASES) - 1)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 16)),
)


@settings(max_examples=200, deadline=None)
@given(base=st.sampled_from(BASES), edits=st.lists(_edits, min_size=1, max_size=4),
       use_expected=st.booleans())
def test_fuzz_mutated_bytes_give_payload_error_or_right_shapes(base, edits, use_expected):
    data = bytearray(base)
    for op, at, arg in edits:
        at = at % (len(data) + 1)
        if op == "flip" and data:
            data[at % len(data)] ^= arg
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = BASES[arg]
        elif op == "delete":
            del data[at:at + arg]
    kwargs = {"expected": SMALL_SHAPES} if use_expected else {"max_elements": 10**5}
    _check_outcome(bytes(data), **kwargs)


_field_edits = st.one_of(
    st.tuples(st.just("shape"), st.lists(st.integers(-2**63, 2**63 - 1), max_size=3)),
    st.tuples(st.just("num_kept"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("rice_k"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("position_code"), st.integers(0, 3)),
    st.tuples(st.just("encoding"), st.integers(0, 4)),
    st.tuples(st.just("scale"), st.floats(width=32)),
    st.tuples(st.just("payload"), st.binary(max_size=64)),
    st.tuples(st.just("signs"), st.binary(max_size=20)),
    st.tuples(st.just("flip_payload"), st.integers(0, 10**6)),
)


@settings(max_examples=200, deadline=None)
@given(base=st.sampled_from(BASES), index=st.integers(0, 3), edits=st.lists(_field_edits, min_size=1, max_size=3),
       use_expected=st.booleans())
def test_fuzz_signed_field_edits_give_payload_error_or_right_shapes(base, index, edits, use_expected):
    """Checksum recomputed after the edit, so the decoder's own validation is what is tested."""
    message = parsed(base)
    t = message.tensors[index]
    for field, value in edits:
        if field == "shape":
            del t.shape[:]
            t.shape.extend(value)
        elif field == "flip_payload":
            if t.payload:
                payload = bytearray(t.payload)
                payload[value % len(payload)] ^= 1 << (value % 8)
                t.payload = bytes(payload)
        else:
            setattr(t, field, value)
    kwargs = {"expected": SMALL_SHAPES} if use_expected else {"max_elements": 10**5}
    _check_outcome(resign(message), **kwargs)
