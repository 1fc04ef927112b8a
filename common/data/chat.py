"""Chat data for supervised fine-tuning: JSONL records, rendering with the chat template, assistant-only labels.

Two record formats, one JSON object per line (blank lines are skipped):
- `{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}` as in
  Hugging Face chat datasets (roles `system`, `user`, `assistant`);
- Alpaca: `{"instruction": "...", "input": "...", "output": "..."}` (`input` optional), read as one user
  message (instruction, then input after a blank line) and the assistant's reply.
Either may carry a client field (default `"client"`) naming the client the record belongs to.

Labels: the loss counts the assistant's tokens only (content and its end-of-turn token). Templates without
`{% generation %}` markers (SmolLM2's ChatML) give no assistant mask, so each assistant turn's character span is
found by rendering the conversation's prefixes (the prompt up to the reply, and the reply closed); tokens are
mapped to characters by the tokenizer's offsets. A template whose prefixes are not prefixes of the whole
rendering is refused with an error rather than guessed at.

Built-in data: the Chit Chat Challenge conversations (`chitchat-dataset` 0.9.0, MIT), each conversation seen
from each sender's side (the sender is the assistant, the other person the user).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from fairedge.common.atomic_files import atomic_write_bytes
from fairedge.common.data.lm_batches import IGNORE_INDEX

CHAT_ROLES = ("system", "user", "assistant")
CHITCHAT_PACKAGE = "chitchat_dataset"


class ChatDataError(ValueError):
    """A chat record that cannot be used; the message names the file, the line and what is wrong."""


@dataclass(frozen=True)
class ChatExample:
    """One conversation, as role/content messages, and the client it belongs to (None: not said)."""

    messages: list[dict[str, str]]
    client: str | None = None


# --- reading ------------------------------------------------------------------------------------------------


def parse_chat_record(record: Any, *, client_field: str = "client") -> ChatExample:
    """One decoded JSON record (either format) -> ChatExample; ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    client = record.get(client_field)
    if client is not None and not isinstance(client, str | int):
        raise ValueError(f"field {client_field!r} must be a string or an integer, got {client!r}")
    client_id = None if client is None else str(client)
    if "messages" in record:
        return ChatExample(_parse_messages(record["messages"]), client_id)
    if "instruction" in record or "output" in record:
        return ChatExample(_parse_alpaca(record), client_id)
    raise ValueError(
        f"unknown record format (keys {sorted(record)}): expected 'messages' "
        f"(a list of role/content objects) or Alpaca's 'instruction', 'input', 'output'"
    )


def _parse_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {'role', 'content'} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {m!r}")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role is {m['role']!r}; allowed: {', '.join(CHAT_ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message: nothing to learn from this conversation")
    return out


def _parse_alpaca(record: Mapping[str, Any]) -> list[dict[str, str]]:
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ValueError(f"Alpaca field {key!r} must be a non-empty string, got {record.get(key)!r}")
    extra = record.get("input", "")
    if not isinstance(extra, str):
        raise ValueError(f"Alpaca field 'input' must be a string, got {extra!r}")
    prompt = record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def read_chat_jsonl(path: str | Path, *, client_field: str = "client") -> list[ChatExample]:
    """All conversations in a JSONL file; a bad record raises ChatDataError naming `path:line`."""
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChatDataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
            try:
                examples.append(parse_chat_record(record, client_field=client_field))
            except ValueError as e:
                raise ChatDataError(f"{path}:{lineno}: {e}") from e
    if not examples:
        raise ChatDataError(f"{path}: no records")
    return examples


def group_by_client(examples: Sequence[ChatExample]) -> dict[str, list[ChatExample]]:
    """Client id -> its conversations, in file order; records without a client field raise."""
    clients: dict[str, list[ChatExample]] = {}
    for i, ex in enumerate(examples):
        if ex.client is None:
            raise ChatDataError(f"record {i} has no client field: give every record one, or use a partitioner")
        clients.setdefault(ex.client, []).append(ex)
    return clients


# --- rendering ----------------------------------------------------------------------------------------------


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn.

    A span covers the reply and the template's end-of-turn marker, not the whitespace after it.
    """
    msgs = [dict(m) for m in messages]
    text = _render(tokenizer, msgs, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, msgs[:i], add_generation_prompt=True)
        closed = _render(tokenizer, msgs[: i + 1], add_generation_prompt=False).rstrip()
        if not (text.startswith(prompt) and text.startswith(closed) and len(prompt) < len(closed)):
            raise ValueError(
                f"the chat template does not render assistant turn {i} as a prefix of the conversation "
                f"(e.g. it rewrites earlier turns or needs a user turn first), so its tokens cannot be labelled"
            )
        spans.append((len(prompt), len(closed)))
    return text, spans


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(rendered, str):
        raise TypeError(f"apply_chat_template returned {type(rendered).__name__}, expected the rendered text")
    return rendered


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]
) -> tuple[list[int], list[int]]:
    """A conversation -> (token ids, labels) with labels -100 except on the assistant's tokens."""
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template: chat data needs an instruction-tuned model's tokenizer")
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for j, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(a <= start < b for a, b in spans):
            labels[j] = ids[j]
    return ids, labels


# --- built-in data: Chit Chat -------------------------------------------------------------------------------


def chitchat_dataset_path() -> Path:
    """`dataset.json` of the installed chitchat-dataset package (found, never imported)."""
    spec = importlib.util.find_spec(CHITCHAT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the built-in chat data needs: pip install --no-deps chitchat-dataset==0.9.0")
    return Path(next(iter(spec.submodule_search_locations))) / "dataset.json"


def chitchat_records(
    dataset: Mapping[str, Any], *, client_by: Literal["sender", "group"] = "sender", groups: int = 10
) -> Iterator[dict[str, Any]]:
    """Chit Chat conversations as `messages` records, one per (conversation, sender as the assistant).

    A turn (one sender's consecutive messages) becomes one message, its lines joined by newlines; leading
    turns of the assistant are dropped so that every record starts with the user. Conversations with one
    sender (an unanswered greeting) are skipped. Client: the assistant's sender id, or with `client_by="group"`
    one of `groups` groups of conversations (by position in the dataset sorted by id).
    """
    if client_by not in ("sender", "group"):
        raise ValueError(f"client_by={client_by!r}: allowed are 'sender' and 'group'")
    if groups < 1:
        raise ValueError(f"groups={groups}: must be >= 1")
    for index, conv_id in enumerate(sorted(dataset)):
        turns = [
            (turn[0]["sender"], "\n".join(m["text"].strip() for m in turn if m["text"].strip()))
            for turn in dataset[conv_id]["messages"]
            if turn
        ]
        senders = list(dict.fromkeys(sender for sender, _ in turns))
        if len(senders) < 2:
            continue
        for me in senders:
            messages = [{"role": "assistant" if s == me else "user", "content": text} for s, text in turns if text]
            while messages and messages[0]["role"] == "assistant":
                messages.pop(0)
            if not any(m["role"] == "assistant" for m in messages):
                continue
            client = me if client_by == "sender" else f"group-{index % groups:03d}"
            yield {"client": client, "conversation": conv_id, "messages": messages}


def write_chitchat_jsonl(
    out: str | Path, *, client_by: Literal["sender", "group"] = "sender", groups: int = 10, min_records: int = 1
) -> dict[str, int]:
    """Write the built-in Chit Chat data as messages JSONL (atomically); returns records per client.

    Clients with fewer than `min_records` conversations are left out.
    """
    dataset = json.loads(chitchat_dataset_path().read_text(encoding="utf-8"))
    records = list(chitchat_records(dataset, client_by=client_by, groups=groups))
    counts: dict[str, int] = {}
    for r in records:
        counts[r["client"]] = counts.get(r["client"], 0) + 1
    kept = {c: n for c, n in counts.items() if n >= min_records}
    lines = [json.dumps(r, ensure_ascii=False) for r in records if r["client"] in kept]
    atomic_write_bytes(Path(out), ("\n".join(lines) + "\n").encode("utf-8"))
    return kept
