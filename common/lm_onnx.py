"""ONNX export of a merged causal LM for generation with past key values (Optimum's decoder-with-past layout).

transformers keeps the KV cache in a `DynamicCache` object; ONNX graphs take tensors. `DecoderWithPast` is the
bridge: it takes `input_ids`, `attention_mask`, `position_ids` and one key and one value tensor per layer,
builds the cache, runs the model and returns the logits and the grown cache as tensors. The dynamo exporter
(opset 18) traces it with dynamic batch, sequence and past-sequence axes, so one graph serves the prompt (past
of length 0) and each decoding step; Optimum calls this the merged "with past" decoder. The export folder is
what an ONNX Runtime user expects: `model.onnx`, optionally `model_quantized.onnx` (blockwise int8 MatMul weights), and
the tokenizer with its chat template. Running it needs no torch: `fairedge.common.lm_generate_ort`.

Every export is checked before it is put in place: ONNX Runtime's logits for a prompt and for decoding steps
fed with the graph's own cache must match PyTorch's within `PARITY_TOLERANCE`.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from fairedge.common.atomic_files import atomic_folder, fsync_dir
from fairedge.common.lm_generate_ort import (
    CHAT_TEMPLATE_FILE,
    FP32_FILE,
    INT8_FILE,
    LmInfo,
    OrtCausalLM,
    input_names,
    output_names,
)
from fairedge.common.quiet_logs import quiet_root_logger

PARITY_TOLERANCE = 1e-3
"""Max abs logit difference allowed between ONNX Runtime fp32 and PyTorch, prompt and decoding steps."""
OPSET = 18
PARITY_PROMPT = (1, 2, 3, 4, 5, 6, 7, 8)
"""Token ids of the export check's prompt (any ids below the vocabulary size do)."""

Log = Callable[[str], None]


class DecoderWithPast(nn.Module):
    """A causal LM as a function of tensors: (ids, mask, positions, per-layer past) -> (logits, per-layer present)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        cache = DynamicCache(ddp_cache_data=past, config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits, [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def lm_info(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, quantized: bool = False) -> LmInfo:
    """The graph's metadata: cache shapes, vocabulary, stop tokens, whether a chat template travels with it."""
    cfg = model.config.get_text_config(decoder=True)
    heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not eos_ids:
        raise ValueError("the model has no EOS token (generation_config.eos_token_id or tokenizer.eos_token_id)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    return LmInfo(
        num_layers=int(cfg.num_hidden_layers),
        num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        vocab_size=int(cfg.vocab_size),
        eos_token_ids=tuple(int(i) for i in eos_ids),
        pad_token_id=int(pad),
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        quantized=quantized,
    )


def load_merged_causal_lm(
    model_dir: str | Path, adapter_dir: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal-LM folder with a PEFT adapter merged into its weights (`merge_and_unload`), in eval mode."""
    from peft import PeftModel

    from fairedge.common.models.causal_lm import load_causal_lm

    model, tokenizer = load_causal_lm(model_dir, device="cpu", dtype=torch.float32)
    if adapter_dir is None:
        return model, tokenizer
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return cast(PreTrainedModel, merged).eval(), tokenizer


def export_causal_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    quantize: bool = True,
    log: Log = print,
) -> Path:
    """Export a merged causal LM to `out_dir` (`model.onnx`, tokenizer, and `model_quantized.onnx` if `quantize`).

    The folder appears only once the fp32 graph passed its parity check. `model` must be a plain
    transformers model: merge a PEFT adapter first (`load_merged_causal_lm`).
    """
    if hasattr(model, "peft_config"):
        raise TypeError("export_causal_lm takes a merged model: call merge_and_unload() on the PEFT model first")
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(f"export_causal_lm exports float32 weights; the model is {dtype}: load it with dtype=float32")
    model.eval()
    info = lm_info(model, tokenizer)
    out_dir = Path(out_dir)
    start = time.perf_counter()
    with atomic_folder(out_dir) as tmp:
        program = _trace(model, info)
        log(f"  traced to ONNX in {time.perf_counter() - start:.0f} s")
        program.model.metadata_props.update(info.to_metadata())
        program.save(str(tmp / FP32_FILE))
        tokenizer.save_pretrained(tmp)
        if info.has_chat_template and not (tmp / CHAT_TEMPLATE_FILE).is_file():
            raise RuntimeError(f"the tokenizer saved no {CHAT_TEMPLATE_FILE}; the edge could not render chats")
        diffs = logits_parity(model, OrtCausalLM(tmp), PARITY_PROMPT, steps=3)
        if max(diffs) > PARITY_TOLERANCE:
            raise RuntimeError(
                f"the exported graph's logits differ from PyTorch's by {max(diffs):.2e} (prompt, then each step: "
                f"{', '.join(f'{d:.1e}' for d in diffs)}); allowed {PARITY_TOLERANCE:.0e}"
            )
        log(f"  fp32 parity {max(diffs):.1e} (allowed {PARITY_TOLERANCE:.0e}); {time.perf_counter() - start:.0f} s")
    if quantize:
        quantize_causal_lm(out_dir)
        log(f"  int8 copy written in {time.perf_counter() - start:.0f} s")
    return out_dir / FP32_FILE


def _trace(model: PreTrainedModel, info: LmInfo) -> Any:
    """`torch.onnx.export` (dynamo) of `DecoderWithPast` with example inputs of batch 2, sequence 3, past 4."""
    from torch.export import Dim

    batch, seq, past_len = 2, 3, 4
    gen = torch.Generator().manual_seed(0)
    past = [
        tuple(torch.randn(batch, info.num_kv_heads, past_len, info.head_dim, generator=gen) for _ in "kv")
        for _ in range(info.num_layers)
    ]
    args = (
        torch.randint(0, info.vocab_size, (batch, seq), generator=gen),
        torch.ones(batch, past_len + seq, dtype=torch.int64),
        torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous(),
        past,
    )
    b, s, p = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
    dynamic = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: Dim.AUTO},  # = past + sequence, which torch.export cannot state
        "position_ids": {0: b, 1: s},
        "past": [({0: b, 2: p}, {0: b, 2: p}) for _ in range(info.num_layers)],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # axis-renaming and deprecation chatter of the exporter
        program = torch.onnx.export(
            DecoderWithPast(model).eval(),
            args,
            dynamic_shapes=dynamic,
            input_names=input_names(info.num_layers),
            output_names=output_names(info.num_layers),
            dynamo=True,
            opset_version=OPSET,
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    _name_mask_axis(program.model)
    return program


def _name_mask_axis(model: Any) -> None:
    """Call the mask's second axis what it is, `past_sequence_length + sequence_length`, as Optimum does."""
    import onnx_ir as ir

    mask = next(v for v in model.graph.inputs if v.name == "attention_mask")
    mask.shape = ir.Shape([mask.shape[0], "past_sequence_length + sequence_length"])


INT8_BLOCK = 32
"""Weights per int8 scale (and per run-time activation scale) in `model_quantized.onnx`."""


def quantize_causal_lm(out_dir: str | Path) -> Path:
    """`model_quantized.onnx` next to `model.onnx`: blockwise int8 weights (`MatMulNBits`, one scale per
    `INT8_BLOCK` weights), activations quantised per block of `INT8_BLOCK` at run time (accuracy level 4).

    Why not ONNX Runtime's `quantize_dynamic`, the usual recipe for encoders: it quantises each activation
    tensor with one scale, and a causal LM's MLP inputs carry a few huge outlier channels. On SmolLM2 that
    scheme predicted PyTorch's next token 73 % of the time; blockwise int8 does 94 %, at 1.6× fp32's
    decoding speed instead of 1.9× (`simulations/results/lm_latency.md` measures both, side by side).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    out_dir = Path(out_dir)
    src = out_dir / FP32_FILE
    proto = onnx.load(str(src))
    info = LmInfo.from_metadata({p.key: p.value for p in proto.metadata_props})
    config = DefaultWeightOnlyQuantConfig(block_size=INT8_BLOCK, is_symmetric=True, bits=8, accuracy_level=4)
    with quiet_root_logger():  # per-node progress chatter
        quantizer = MatMulNBitsQuantizer(proto, algo_config=config)
        quantizer.process()
    proto = quantizer.model.model
    kept = [p for p in proto.metadata_props if not p.key.startswith("fairedge.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in LmInfo(**{**info.__dict__, "quantized": True}).to_metadata().items():
        proto.metadata_props.add(key=key, value=value)
    dst = out_dir / INT8_FILE
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        onnx.save(proto, f"{tmp}/{INT8_FILE}")
        os.replace(f"{tmp}/{INT8_FILE}", dst)
    fsync_dir(out_dir)
    return dst


def logits_parity(model: PreTrainedModel, lm: OrtCausalLM, prompt_ids: Sequence[int], *, steps: int = 5) -> list[float]:
    """Max abs logit difference ONNX Runtime vs PyTorch: the prompt, then `steps` decoding steps.

    Both sides decode PyTorch's greedy tokens, each with its own cache (ORT is fed its own `present.*`).
    """
    ids = torch.tensor([list(prompt_ids)])
    mask = np.ones((1, ids.shape[1]), np.int64)
    cache = DynamicCache(config=model.config)
    past = lm.empty_past(1)
    diffs: list[float] = []
    for _ in range(steps + 1):
        with torch.no_grad():
            want = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        got, past = lm.forward(ids.numpy(), mask, past)
        diffs.append(float(np.abs(got - want.numpy()).max()))
        ids = want[:, -1:].argmax(dim=-1)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
    return diffs
