"""Language-model data: federated Shakespeare, chat JSONL (both formats, assistant-only labels), LM batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from fairedge.common.data.chat import (
    ChatDataError,
    chitchat_records,
    group_by_client,
    read_chat_jsonl,
    render_chat,
    write_chitchat_jsonl,
)
from fairedge.common.data.lm_batches import IGNORE_INDEX, build_examples, iterate_batches, tokenize_plain
from fairedge.common.data.shakespeare import load_shakespeare, parse_play
from fairedge.common.models.causal_lm import builtin_gguf_path


@pytest.fixture(scope="module")
def tokenizer():
    gguf = builtin_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


# --- Shakespeare --------------------------------------------------------------------------------------------

PLAY = """\
HAMLET

PERSONS REPRESENTED.

Hamlet, Prince of Denmark.


ACT I.

Scene I. Elsinore.

[Enter Bernardo and Francisco.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.
[Aside.] Long live the king!

[Exit Bernardo.]

I think I hear them.

First Clown.
Is she to be buried in Christian burial?

SCENE II. A room.

This line follows a heading and belongs to nobody.
"""

DREAM = """\
ACT I.

THESEUS
Now, fair Hippolyta, our nuptial hour
Draws on apace.

HIPPOLYTA
Four days will quickly steep themselves in nights;

EPILOGUE
"""


def test_parse_play_speakers_stage_directions_and_headings():
    roles = parse_play(PLAY)
    assert roles == {
        "Ber": ["Who's there?"],
        "Fran": ["Nay, answer me: stand, and unfold yourself.", "Long live the king!", "I think I hear them."],
        "First Clown": ["Is she to be buried in Christian burial?"],
    }


def test_parse_play_upper_case_tags_without_a_period():
    assert parse_play(DREAM) == {
        "THESEUS": ["Now, fair Hippolyta, our nuptial hour", "Draws on apace."],
        "HIPPOLYTA": ["Four days will quickly steep themselves in nights;"],
    }
    assert parse_play("A poem with no acts.\n\nNo speakers either.\n") == {}


def test_load_shakespeare_roles_and_positional_split():
    clients = load_shakespeare(min_lines=50)
    assert 400 <= len(clients) <= 480  # LEAF-style parse: about 436 (play, role) pairs with >= 50 lines
    assert len({c.play for c in clients.values()}) == 37  # every play, no poem
    hamlet = clients["hamlet/Ham"]
    assert (hamlet.play, hamlet.role) == ("hamlet", "Ham")
    assert len(hamlet.train) + len(hamlet.test) > 1000
    assert len(hamlet.train) == round(0.8 * (len(hamlet.train) + len(hamlet.test)))
    assert hamlet.train[0].startswith("A little more than kin")  # his first line opens the training part
    assert hamlet.test[-1].endswith("the rest is silence.")  # his last words are held out
    assert "hamlet/1 Clown" in clients  # a numbered tag is a role too
    assert all(len(c.train) + len(c.test) >= 50 and c.test for c in clients.values())
    assert not any(line.startswith("[") or line.startswith("ACT ") for c in clients.values() for line in c.train)
    assert "midsummer_nights_dream/THESEUS" in clients
    assert load_shakespeare(min_lines=50) == clients  # deterministic
    with pytest.raises(ValueError, match="train_fraction"):
        load_shakespeare(train_fraction=1.0)


# --- chat JSONL ---------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_read_both_formats_with_clients(tmp_path):
    path = _write_jsonl(
        tmp_path / "data.jsonl",
        [
            {
                "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                "client": "a",
            },
            "",
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "client": 7},
            {"instruction": "Say yes.", "output": "Yes."},
        ],
    )
    examples = read_chat_jsonl(path)
    assert [e.client for e in examples] == ["a", "7", None]
    assert examples[1].messages == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert examples[2].messages[0] == {"role": "user", "content": "Say yes."}
    with pytest.raises(ChatDataError, match="record 2 has no client field"):
        group_by_client(examples)
    assert list(group_by_client(examples[:2])) == ["a", "7"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"text": "hello"}, "unknown record format"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\].role is 'bot'"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant message"),
        ({"messages": [{"role": "assistant", "content": 3}]}, r"messages\[0\].content must be a string"),
        ({"instruction": "Do it.", "output": ""}, "'output' must be a non-empty string"),
        ({"instruction": "Do it.", "output": "ok", "client": [1]}, "'client' must be a string or an integer"),
    ],
)
def test_a_bad_record_names_its_file_and_line(tmp_path, bad, message):
    good = {"instruction": "Say hi.", "output": "Hi."}
    path = _write_jsonl(tmp_path / "chat.jsonl", [good, good, bad])
    with pytest.raises(ChatDataError, match=rf"chat.jsonl:3: .*{message}"):
        read_chat_jsonl(path)


def test_assistant_only_labels_on_a_real_rendered_conversation(tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4.\nObviously."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": " 6, with a leading space."},
    ]
    ids, labels = render_chat(tokenizer, messages)
    assert ids == tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]  # same tokens as the template
    learned = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    assert tokenizer.decode(learned) == "4.\nObviously.<|im_end|> 6, with a leading space.<|im_end|>"
    # the spans are contiguous: one run of labelled tokens per assistant turn
    runs = sum(1 for j in range(len(labels)) if labels[j] != IGNORE_INDEX and (j == 0 or labels[j - 1] == IGNORE_INDEX))
    assert runs == 2


def test_default_system_prompt_of_the_template_is_not_learned(tokenizer):
    ids, labels = render_chat(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}])
    text = tokenizer.decode(ids)
    assert "You are a helpful AI assistant named SmolLM" in text  # SmolLM2's template adds it
    assert tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX]) == "Hey<|im_end|>"


def test_chitchat_records_from_each_senders_side():
    dataset = {
        "c2": {"messages": [[{"text": "lonely hello", "sender": "x"}]]},
        "c1": {
            "messages": [
                [{"text": "hi", "sender": "a"}, {"text": "how are you?", "sender": "a"}],
                [{"text": "good", "sender": "b"}],
                [{"text": "nice", "sender": "a"}],
            ]
        },
    }
    records = list(chitchat_records(dataset))
    assert records == [
        {
            "client": "a",
            "conversation": "c1",
            "messages": [
                {"role": "user", "content": "good"},
                {"role": "assistant", "content": "nice"},
            ],
        },
        {
            "client": "b",
            "conversation": "c1",
            "messages": [
                {"role": "user", "content": "hi\nhow are you?"},
                {"role": "assistant", "content": "good"},
                {"role": "user", "content": "nice"},
            ],
        },
    ]
    grouped = list(chitchat_records(dataset, client_by="group", groups=3))
    assert {r["client"] for r in grouped} == {"group-000"}


def test_builtin_chitchat_jsonl_reads_back(tmp_path):
    out = tmp_path / "chitchat.jsonl"
    counts = write_chitchat_jsonl(out, min_records=100)
    assert 5 <= len(counts) <= 60 and all(n >= 100 for n in counts.values())
    examples = read_chat_jsonl(out)
    assert len(examples) == sum(counts.values())
    assert {c: len(v) for c, v in group_by_client(examples).items()} == counts


# --- LM batches ---------------------------------------------------------------------------------------------


def test_packing_concatenates_with_eos_and_cuts_blocks():
    texts = [([1, 2, 3], [1, 2, 3]), ([], []), ([4, 5], [4, -100])]
    ex = build_examples(texts, seq_len=4, pack=True, eos_id=0, pad_id=9)
    assert ex.input_ids.tolist() == [[1, 2, 3, 0], [4, 5, 0, 9]]
    assert ex.labels.tolist() == [[1, 2, 3, 0], [4, -100, 0, -100]]
    assert ex.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert ex.label_tokens == 6


def test_one_example_per_text_truncates_and_pads():
    texts = [([1, 2, 3, 4, 5], [-100, -100, 3, 4, 5]), ([6], [6])]
    ex = build_examples(texts, seq_len=3, pack=False, eos_id=0, pad_id=9)
    assert ex.input_ids.tolist() == [[1, 2, 3], [6, 9, 9]]
    assert ex.labels.tolist() == [[-100, -100, 3], [6, -100, -100]]
    assert ex.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="seq_len"):
        build_examples(texts, seq_len=1, pack=False, eos_id=0, pad_id=9)
    with pytest.raises(ValueError, match="no tokens"):
        build_examples([([], [])], seq_len=3, pack=True, eos_id=0, pad_id=9)


def test_batches_are_deterministic_per_seed_and_cover_every_example(tokenizer):
    lines = [f"Line number {i} of the play." for i in range(23)]
    ex = build_examples(tokenize_plain(tokenizer, lines), seq_len=8, pack=False, eos_id=2, pad_id=2)

    def order(seed):
        return [b["input_ids"] for b in iterate_batches(ex, 4, seed=seed)]

    first, again, other = order(1), order(1), order(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert sorted(map(tuple, torch.cat(first).tolist())) == sorted(map(tuple, ex.input_ids.tolist()))
    assert [len(b) for b in first] == [4, 4, 4, 4, 4, 3]
    assert [len(b["labels"]) for b in iterate_batches(ex, 4, seed=1, drop_last=True)] == [4] * 5
    in_order = torch.cat([b["input_ids"] for b in iterate_batches(ex, 5)])
    assert torch.equal(in_order, ex.input_ids)
