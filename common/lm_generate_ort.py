"""Greedy generation with an exported causal LM on ONNX Runtime: numpy, onnxruntime and tokenizers only.

The graph (`fairedge.common.lm_onnx.export_causal_lm`) follows Optimum's decoder-with-past layout: inputs
`input_ids`, `attention_mask`, `position_ids` and `past_key_values.{i}.key/value`; outputs `logits` and
`present.{i}.key/value`. One graph serves the prompt (an empty past, length 0) and every decoding step (the
new token with the previous step's `present.*` fed back as `past_key_values.*`), so a device loads one session.
The export folder holds the tokenizer as Hugging Face saves it (`tokenizer.json`, `tokenizer_config.json`,
`chat_template.jinja`); chat messages are rendered with that template by jinja2, as transformers does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

METADATA_PREFIX = "fairedge."
LM_FORMAT = "causal-lm-with-past"
"""`fairedge.format` of an exported causal LM (the classifier exports carry no such key)."""
FP32_FILE = "model.onnx"
INT8_FILE = "model_quantized.onnx"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

Messages = Sequence[Mapping[str, str]]


def input_names(num_layers: int) -> list[str]:
    """The graph inputs, in order (Optimum's names)."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past]


def output_names(num_layers: int) -> list[str]:
    """The graph outputs, in order (Optimum's names)."""
    return ["logits", *(f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value"))]


@dataclass(frozen=True)
class LmInfo:
    """What a generation loop needs to know about the graph, read from its `fairedge.*` metadata."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    has_chat_template: bool
    quantized: bool

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: str = "the model") -> LmInfo:
        values = {k.removeprefix(METADATA_PREFIX): v for k, v in metadata.items() if k.startswith(METADATA_PREFIX)}
        if values.get("format") != json.dumps(LM_FORMAT):
            raise ValueError(
                f"{source} is not a causal LM exported with past key values (metadata fairedge.format = "
                f"{values.get('format')!r}, expected {json.dumps(LM_FORMAT)!r}): export it with "
                "fairedge.common.lm_onnx.export_causal_lm"
            )
        parsed = {k: json.loads(v) for k, v in values.items()}
        fields = cls.__dataclass_fields__
        missing = sorted(set(fields) - set(parsed))
        if missing:
            raise ValueError(f"{source} lacks the metadata {[METADATA_PREFIX + m for m in missing]}")
        parsed["eos_token_ids"] = tuple(int(i) for i in parsed["eos_token_ids"])
        return cls(**{k: parsed[k] for k in fields})

    def to_metadata(self) -> dict[str, str]:
        """`fairedge.*` keys with JSON values, for the graph's `metadata_props`."""
        values: dict[str, Any] = {"format": LM_FORMAT, **{k: getattr(self, k) for k in self.__dataclass_fields__}}
        values["eos_token_ids"] = list(self.eos_token_ids)
        return {METADATA_PREFIX + k: json.dumps(v) for k, v in values.items()}


def lm_session(path: str | Path, *, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session at the default (full) optimisation level."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _raise_template_error(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


class OrtCausalLM:
    """An exported causal LM on ONNX Runtime: prompt rendering, tokenisation and greedy decoding with a KV cache.

    `model` is an export folder (its `model.onnx`; `quantized=True` picks `model_quantized.onnx`) or an ONNX file
    inside one; the tokenizer files are read from the same folder.
    """

    def __init__(self, model: str | Path, *, quantized: bool = False, threads: int | None = None) -> None:
        path = Path(model)
        if path.is_dir():
            path = path / (INT8_FILE if quantized else FP32_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"no exported causal LM at {path}: export it with export_causal_lm first")
        self.path = path
        self.session = lm_session(path, threads=threads)
        self.info = LmInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map, str(path))
        got = [i.name for i in self.session.get_inputs()]
        if got != input_names(self.info.num_layers):
            raise ValueError(f"{path}: graph inputs {got[:5]}... are not the decoder-with-past inputs this loop feeds")
        self._outputs = output_names(self.info.num_layers)
        self._tokenizer: Any = None
        self._template: Any = None

    # --- text in, text out --------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The `tokenizers.Tokenizer` saved next to the graph (loaded on first use)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            file = self.path.parent / TOKENIZER_FILE
            if not file.is_file():
                raise FileNotFoundError(f"no tokenizer at {file}: the export folder is incomplete")
            self._tokenizer = Tokenizer.from_file(str(file))
        return self._tokenizer

    def render_chat(self, messages: Messages, *, add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` under the exported chat template (jinja2, sandboxed, as transformers)."""
        if not self.info.has_chat_template:
            raise ValueError(f"{self.path} was exported without a chat template: pass a plain string prompt")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = _raise_template_error  # templates use it to reject bad chats
            self._template = env.from_string((self.path.parent / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8"))
        special = json.loads((self.path.parent / TOKENIZER_CONFIG_FILE).read_text(encoding="utf-8"))
        tokens = {
            k: special[k]
            for k in ("bos_token", "eos_token", "pad_token", "unk_token")
            if isinstance(special.get(k), str)
        }
        return str(
            self._template.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **tokens
            )
        )

    def prompt_ids(self, messages_or_prompt: str | Messages) -> list[int]:
        """Token ids of a chat (through the chat template, no extra special tokens) or of a plain string."""
        if isinstance(messages_or_prompt, str):
            return list(self.tokenizer.encode(messages_or_prompt).ids)
        return list(self.tokenizer.encode(self.render_chat(messages_or_prompt), add_special_tokens=False).ids)

    def generate(self, messages_or_prompt: str | Messages, max_new_tokens: int = 64) -> str:
        """The greedy reply (special tokens dropped), like `fairedge.common.models.causal_lm.generate_greedy`."""
        new = self.generate_ids([self.prompt_ids(messages_or_prompt)], max_new_tokens)[0]
        return str(self.tokenizer.decode(new, skip_special_tokens=True))

    # --- ids in, ids out ----------------------------------------------------------------------------------

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Past key values of length 0: the feed for a prompt."""
        shape = (batch, self.info.num_kv_heads, 0, self.info.head_dim)
        return {name: np.zeros(shape, np.float32) for name in input_names(self.info.num_layers)[3:]}

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One run: logits for `input_ids` after `past`, and the grown cache keyed as the next run's inputs.

        `attention_mask` covers past and new tokens (0 for left padding); positions count the unmasked tokens.
        """
        position_ids = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)[:, -input_ids.shape[1] :]
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, **past}
        logits, *present = self.session.run(self._outputs, feeds)
        return logits, dict(zip(input_names(self.info.num_layers)[3:], present, strict=True))

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        stop_at_eos: bool = True,
        stamps: list[float] | None = None,
    ) -> list[list[int]]:
        """Greedy continuation of each prompt (left-padded into one batch), stopping at an EOS token.

        Each list holds the new tokens only, the EOS that ended it included (as `model.generate` returns it).
        `stop_at_eos=False` always runs `max_new_tokens` steps (a benchmark's fixed amount of work).
        `stamps`, if given, receives `time.perf_counter()` after each step: the prompt's, then one per token.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate_ids needs at least one prompt, each with at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")
        width = max(len(p) for p in prompts)
        pad = self.info.pad_token_id
        ids = np.array([[pad] * (width - len(p)) + list(p) for p in prompts], np.int64)
        mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int64)
        past = self.empty_past(len(prompts))
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), bool)
        eos = np.array(self.info.eos_token_ids, np.int64)
        for _ in range(max_new_tokens):
            logits, past = self.forward(ids, mask, past)
            token = np.where(done, pad, logits[:, -1].argmax(axis=-1))
            if stamps is not None:
                stamps.append(time.perf_counter())
            for row, t in enumerate(token):
                if not done[row]:
                    out[row].append(int(t))
            if stop_at_eos:
                done |= np.isin(token, eos)
            if done.all():
                break
            ids = token[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        return out
