"""The training data formats and the built-in tokenizer: which tokens take loss, and errors on bad files."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from moraft import testing
from moraft.errors import UserError
from moraft.train.builtin import char_tokenizer, tiny_llama
from moraft.train.data import IGNORE, Collator, load_examples, uuid_pairs


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def trained_text(tok, example) -> str:
    """The text of the positions that take loss."""
    return tok.decode([i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_tokenizer_round_trips_text_and_saves(tok, tmp_path):
    text = "Hello, world!\n\tkey:value 123 ~"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1  # one token per character
    assert tok.decode(ids, skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text).input_ids == ids and again.chat_template == tok.chat_template


def test_builtin_model_is_the_same_for_the_same_seed():
    a, _ = tiny_llama(seed=3, hidden_size=32, num_layers=1)
    b, _ = tiny_llama(seed=3, hidden_size=32, num_layers=1)
    c, _ = tiny_llama(seed=4, hidden_size=32, num_layers=1)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert wa.equal(wb) and not wa.equal(wc)
    # the tests' factory builds on the same config: the same arguments give the built-in model
    factory = testing.tiny_llama(3, hidden_size=32, num_layers=1)
    assert all(x.equal(y) for x, y in zip(factory.state_dict().values(), a.state_dict().values(), strict=True))
    assert factory.config.vocab_size == testing.VOCAB_SIZE == len(char_tokenizer())


def test_uuid_memory_loss_on_whole_sequence(tok):
    pairs = uuid_pairs(5, seed=7)
    assert pairs == uuid_pairs(5, seed=7) and pairs != uuid_pairs(5, seed=8)
    assert all(len(k) == len(v) == 36 and k.count("-") == 4 for k, v in pairs)
    examples = load_examples("uuid-memory", tok, num_pairs=5, seed=7)
    assert len(examples) == 5
    key, value = pairs[0]
    assert examples[0]["labels"] == examples[0]["input_ids"]
    assert tok.decode(examples[0]["input_ids"]) == f"<s>{key}:{value}</s>"


def test_chat_loss_on_assistant_turns_only(tok, tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6, of course"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    (example,) = load_examples(str(path), tok)
    assert tok.decode(example["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)
    # exactly the replies and their end-of-turn markers take loss, not the prompts or role headers
    assert trained_text(tok, example) == "4<|end|>\n6, of course<|end|>\n"


def test_prompt_completion_loss_on_completion(tok, tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: capital of France? A:", "completion": " Paris"}])
    (example,) = load_examples(str(path), tok)
    assert tok.decode(example["input_ids"]) == "<s>Q: capital of France? A: Paris</s>"
    assert trained_text(tok, example) == " Paris</s>"


def test_text_packed_to_seq_length(tok, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("abcdefghij" * 3)  # 30 chars + bos + eos = 32 tokens
    (tmp_path / "docs" / "b.txt").write_text("0123456789")  # 12 tokens
    examples = load_examples(str(tmp_path / "docs"), tok, seq_length=10)
    assert len(examples) == 4 and all(len(e["input_ids"]) == 10 for e in examples)  # 44 tokens, remainder dropped
    assert all(e["labels"] == e["input_ids"] for e in examples)
    stream = sum((e["input_ids"] for e in examples), [])
    assert tok.decode(stream) == "<s>" + "abcdefghij" * 3 + "</s><s>0123456"


def test_collator_pads_right_and_masks(tok):
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4], "labels": [IGNORE]}]
    batch = Collator(tok.pad_token_id)(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, tok.pad_token_id, tok.pad_token_id]]
    assert batch["labels"].tolist() == [[1, 2, 3], [IGNORE] * 3]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize(
    "lines, expected",
    [
        (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": '], "line 2: not valid JSON"),
        (['{"prompt": "a", "completion": "b"}', '[1, 2]'], "line 2: expected a JSON object, got list"),
        (['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'], "line 2: 'completion' must be a string, but it is"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], "line 1: no 'assistant' message"),
        (['{"messages": [{"role": "user"}]}'], "line 1: message 0 must be an object with string 'role' and 'content'"),
        (['', '{"text": "x"}'], "line 2: cannot tell the data format from keys ['text']"),
    ],
)
def test_malformed_jsonl_names_line_and_problem(tok, tmp_path, lines, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=expected.replace("[", r"\[").replace("]", r"\]")) as err:
        load_examples(str(path), tok)
    assert str(path) in str(err.value)


def test_missing_data_file(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'uuid-memory' nor an existing file"):
        load_examples(str(tmp_path / "nope.jsonl"), tok)
