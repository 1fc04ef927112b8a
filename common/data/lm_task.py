"""Causal-LM tasks with natural clients: federated Shakespeare (a client per role) and chat (a client per id).

Each client's own text is split by position into train and held-out test, the way LEAF splits
Shakespeare, so the held-out perplexity of a client measures how well the model predicts more of
*that* client's text. The clients of a run are `data.clients`, or `federation.num_clients` of the
eligible ones drawn with the run's seed (in id order, so every machine picks the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from fairedge.common.config import DataConfig
from fairedge.common.data.chat import (
    group_by_client,
    read_chat_jsonl,
    render_chat,
    write_chitchat_jsonl,
)
from fairedge.common.data.lm_batches import TokenizedText, build_examples, special_ids, tokenize_plain
from fairedge.common.data.shakespeare import load_shakespeare
from fairedge.common.data.task_data import TaskData
from fairedge.common.data.token_data import TokenData

DEFAULT_PROMPTS = {
    "shakespeare": ["O gentle night, that", "My lord, I come to tell you"],
    "chat": ["Hey! What are you up to this weekend?", "What kind of music do you like?"],
}
"""Fixed prompts whose greedy replies (base vs final) go into a run's report: verse openings to continue
for Shakespeare (its clients train on plain text), user turns through the chat template for chat."""

BUILTIN_CHAT_FILE = "chitchat-by-sender.jsonl"
"""The built-in chat data (Chit Chat, one client per sender), written once into the model cache folder."""


def choose_clients(available: Sequence[str], wanted: list[str] | None, count: int, seed: int, what: str) -> list[str]:
    """`wanted` (each must exist), or `count` of `available` drawn with `seed`, in id order."""
    if wanted is not None:
        missing = [c for c in wanted if c not in set(available)]
        if missing:
            raise ValueError(
                f"data.clients: {missing[:3]} not among the {len(available)} eligible {what} "
                f"(e.g. {list(available[:3])}; see data.min_lines)"
            )
        return list(wanted)
    if count > len(available):
        raise ValueError(
            f"federation.num_clients={count} but only {len(available)} {what} are eligible (lower data.min_lines "
            "or federation.num_clients)"
        )
    picked = np.random.default_rng(seed).choice(len(available), size=count, replace=False)
    return [available[i] for i in sorted(picked.tolist())]


def _truncate(texts: list[TokenizedText], max_tokens: int) -> list[TokenizedText]:
    """The first `max_tokens` tokens of a client's held-out texts."""
    out, left = [], max_tokens
    for ids, labels in texts:
        if left <= 0:
            break
        out.append((ids[:left], labels[:left]))
        left -= len(ids)
    return out


def builtin_chat_path(cache_dir: Path) -> Path:
    """The built-in chat JSONL (Chit Chat, a client per sender), written on first use."""
    path = cache_dir / BUILTIN_CHAT_FILE
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_chitchat_jsonl(path, client_by="sender")
        path.chmod(0o644)  # data a person reads
    return path


def load_lm_task(
    d: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_clients: int,
    seed: int,
    cache_dir: Path,
    only: int | None = None,
) -> TaskData:
    """The run's clients, each with its train and held-out `TokenData` (domain = client index).

    `only` (a client index): tokenize that client alone; the others keep their place in `domains`
    but get no rows. What one simulated client needs, at a cost independent of the run's client count.
    """
    eos_id, pad_id = special_ids(tokenizer)
    per_client: dict[str, tuple[list[TokenizedText], list[TokenizedText]]] = {}
    if d.task == "shakespeare":
        plays = {c.split("/", 1)[0] for c in d.clients} if d.clients else None  # parse only what is needed
        roles = load_shakespeare(min_lines=d.min_lines, train_fraction=d.train_fraction, plays=plays)
        for i, c in enumerate(choose_clients(list(roles), d.clients, num_clients, seed, "Shakespeare roles")):
            if only is not None and i != only:
                per_client[c] = ([], [])
                continue
            train_text, test_text = tokenize_plain(tokenizer, ["\n".join(roles[c].train), "\n".join(roles[c].test)])
            per_client[c] = ([train_text], [test_text])
    elif d.task == "chat":
        path = Path(d.path) if d.path else builtin_chat_path(cache_dir)
        if not path.is_file():
            raise FileNotFoundError(f"data.path={str(path)!r} does not exist on this machine")
        if d.client_field is None:  # one client: the whole file (a SuperNode's own data)
            by_client = {path.stem: read_chat_jsonl(path, client_field="")}
            chosen = list(by_client)
        else:
            by_client = group_by_client(read_chat_jsonl(path, client_field=d.client_field))
            eligible = [c for c in sorted(by_client) if len(by_client[c]) >= d.min_lines]
            chosen = choose_clients(eligible, d.clients, num_clients, seed, f"chat clients of {path.name}")
        for i, c in enumerate(chosen):
            if only is not None and i != only:
                per_client[c] = ([], [])
                continue
            convs = by_client[c]
            n_train = min(max(1, round(d.train_fraction * len(convs))), len(convs) - 1)
            rendered = [render_chat(tokenizer, ex.messages) for ex in convs]
            per_client[c] = (rendered[:n_train], rendered[n_train:])
    else:
        raise ValueError(f"data.task={d.task!r} is not a causal-LM task")
    if only is not None and not 0 <= only < len(per_client):
        raise ValueError(f"client index {only} outside [0, {len(per_client)})")
    pack = d.pack if d.pack is not None else d.task == "shakespeare"
    train_parts, test_parts = [], []
    for i, (train, test) in enumerate(per_client.values()):
        if only is not None and i != only:
            continue
        train_parts.append(
            TokenData.of(build_examples(train, seq_len=d.seq_len, pack=pack, eos_id=eos_id, pad_id=pad_id), i)
        )
        held_out = _truncate(test, d.max_eval_tokens)
        test_parts.append(
            TokenData.of(build_examples(held_out, seq_len=d.seq_len, pack=pack, eos_id=eos_id, pad_id=pad_id), i)
        )
    return TaskData(
        train=TokenData.concat(train_parts),
        test=TokenData.concat(test_parts),
        classes=[],
        domains=list(per_client),
        source_domain="",
        kind="causal-lm",
    )


def prompt_input(task: str, prompt: str) -> str | list[dict[str, str]]:
    """What the model is given for a report prompt: plain text to continue, or a user turn of a chat."""
    return [{"role": "user", "content": prompt}] if task == "chat" else prompt
