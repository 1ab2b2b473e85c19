"""Training data through datasets and TRL: every source kind is read, columns are mapped, sources mix by examples or
by tokens, and TRL's preparation takes the loss where each format says (checked on the tokens that train)."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from datasets import Dataset, DatasetDict
from helpers import tiny_options
from transformers import AutoTokenizer

from moraft import testing
from moraft.errors import UserError
from moraft.train import DataOptions, apply_method, load_data, train
from moraft.train.builtin import char_tokenizer, tiny_llama
from moraft.train.data import IGNORE, mixing_probabilities, uuid_pairs
from moraft.train.runner import make_trainer


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prepared(tmp_path, tok, **groups):
    """The dataset TRL trains on (tokenized, masked, packed) for these options, and its trainer."""
    options = tiny_options(tmp_path / "out", **groups)
    data, _ = load_data(options.data, tok)
    model, _ = tiny_llama(0, 32, 1)
    trainer = make_trainer(options, apply_method(model, options.adapter), tok, data)
    return trainer.train_dataset, trainer


def trained_text(tok, example) -> str:
    """The text of the positions that take loss."""
    return tok.decode([i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE])


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


# -- what trains: TRL's preparation of each format ------------------------------------------------------------------


def test_uuid_memory_loss_on_whole_sequence(tok, tmp_path):
    pairs = uuid_pairs(5, seed=7)
    assert pairs == uuid_pairs(5, seed=7) and pairs != uuid_pairs(5, seed=8)
    assert all(len(k) == len(v) == 36 and k.count("-") == 4 for k, v in pairs)
    data, _ = prepared(tmp_path, tok, data={"num_pairs": 5, "seed": 7})
    assert len(data) == 5  # not packed: each pair stays one example
    key, value = pairs[0]
    assert tok.decode(data[0]["input_ids"]) == f"<s>{key}:{value}</s>"
    assert data[0]["labels"] == data[0]["input_ids"]


def test_chat_loss_on_assistant_turns_only(tok, tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6, of course"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    data, _ = prepared(tmp_path, tok, data={"dataset": str(path)})
    example = data[0]
    assert tok.decode(example["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)
    # exactly the replies and their end-of-turn markers take loss (the built-in template's {% generation %} blocks)
    assert trained_text(tok, example) == "4<|end|>6, of course<|end|>"


def test_prompt_completion_loss_on_completion(tok, tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: capital of France? A:", "completion": " Paris"}])
    data, _ = prepared(tmp_path, tok, data={"dataset": str(path)})
    assert tok.decode(data[0]["input_ids"]) == "<s>Q: capital of France? A: Paris</s>"
    assert trained_text(tok, data[0]) == " Paris</s>"


def test_text_packed_into_blocks(tok, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("abcdefghij" * 3)  # 30 chars + bos + eos = 32 tokens
    (tmp_path / "docs" / "b.txt").write_text("0123456789")  # 12 tokens
    data, _ = prepared(tmp_path, tok, data={"dataset": str(tmp_path / "docs"), "seq_length": 10})
    assert [len(e["input_ids"]) for e in data] == [10, 10, 10, 10, 4]  # 44 tokens, wrapped (the last block short)
    assert all(e["labels"] == e["input_ids"] for e in data)
    stream = sum((e["input_ids"] for e in data), [])
    assert tok.decode(stream) == "<s>" + "abcdefghij" * 3 + "</s><s>0123456789</s>"


def test_bfd_packing_keeps_examples_apart(tok, tmp_path):
    """Packed chat examples (padding-free, position ids restarting per example) give the loss the same examples give
    one by one: no example attends to another, on CPU attention too."""
    records = [{"messages": [{"role": "user", "content": f"q{i}" * (i + 1)},
                             {"role": "assistant", "content": f"answer {i}" * (2 - i % 2)}]} for i in range(3)]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    data, trainer = prepared(tmp_path, tok, data={"dataset": str(path), "packing": "bfd", "seq_length": 256},
                             optimization={"batch_size": 3})
    assert len(data) == 1  # the three examples in one block
    batch = trainer.data_collator([data[0]])
    assert "attention_mask" not in batch and (batch["position_ids"] == 0).sum() == 3
    model = trainer.model.eval()
    labels = batch["labels"]
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=labels, use_cache=False)
    plain, _ = prepared(tmp_path, tok, data={"dataset": str(path), "packing": "none"})
    total = count = 0.0
    for example in plain:
        ids, lab = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
        n = (lab[:, 1:] != IGNORE).sum().item()
        total += model(input_ids=ids, labels=lab, use_cache=False).loss.item() * n
        count += n
    assert (labels[:, 1:] != IGNORE).sum().item() == count
    assert abs(packed.loss.item() - total / count) < 1e-5


# -- sources ---------------------------------------------------------------------------------------------------------

ROWS = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(6)]


def _write(kind: str, tmp_path):
    frame = Dataset.from_list(ROWS)
    if kind == "parquet":
        frame.to_parquet(str(tmp_path / "rows.parquet"))
        return tmp_path / "rows.parquet"
    if kind == "csv":
        frame.to_csv(str(tmp_path / "rows.csv"), index=False)
        return tmp_path / "rows.csv"
    if kind == "tsv":
        frame.to_csv(str(tmp_path / "rows.tsv"), index=False, sep="\t")
        return tmp_path / "rows.tsv"
    if kind == "arrow":
        frame.save_to_disk(str(tmp_path / "saved"))
        arrow = next((tmp_path / "saved").glob("*.arrow"))
        return arrow
    if kind == "jsonl.gz":
        with gzip.open(tmp_path / "rows.jsonl.gz", "wt") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in ROWS)
        return tmp_path / "rows.jsonl.gz"
    if kind == "save_to_disk":
        DatasetDict({"train": frame, "test": frame.select([0])}).save_to_disk(str(tmp_path / "dict"))
        return tmp_path / "dict"
    if kind == "directory":
        (tmp_path / "parts").mkdir()
        write_jsonl(tmp_path / "parts" / "a.jsonl", ROWS[:3])
        write_jsonl(tmp_path / "parts" / "b.jsonl", ROWS[3:])
        return tmp_path / "parts"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["parquet", "csv", "tsv", "arrow", "jsonl.gz", "save_to_disk", "directory"])
def test_every_kind_of_source_reads_the_same_rows(tok, tmp_path, kind):
    data, fmt = load_data(DataOptions(dataset=str(_write(kind, tmp_path))), tok)
    assert fmt == "prompt-completion" and sorted(data, key=lambda r: r["prompt"]) == ROWS


def test_save_to_disk_split_and_unknown_split(tok, tmp_path):
    path = str(_write("save_to_disk", tmp_path))
    data, _ = load_data(DataOptions(dataset=path, split="test"), tok)
    assert list(data) == ROWS[:1]
    with pytest.raises(UserError, match="data split 'validation' is not a split of .*; its splits are: train, test"):
        load_data(DataOptions(dataset=path, split="validation"), tok)


def test_a_dataset_in_the_local_cache_by_name(tok, tmp_path, monkeypatch):
    """A Hub dataset id with data.local_files_only resolves to the datasets cache alone (no request to the Hub):
    the cache layout datasets writes for a Hub dataset ({user}___{name}/{config}/{version}/{hash}/), made here from a
    local file. Downloads are tested in test_hub.py."""
    import datasets

    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    built = datasets.load_dataset("json", data_files=str(write_jsonl(tmp_path / "r.jsonl", ROWS)),
                                  cache_dir=str(cache / "built"))
    source = next((cache / "built" / "json").glob("*/*/*"))
    target = cache / "someone___facts" / "default" / "0.0.0" / source.name
    target.parent.mkdir(parents=True)
    source.rename(target)
    for arrow in target.glob("json-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("json-", "facts-")))
    del built
    data, fmt = load_data(DataOptions(dataset="someone/facts", local_files_only=True), tok)
    assert fmt == "prompt-completion" and list(data) == ROWS


def test_column_mapping(tok, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"id": 1, "question": "q", "answer": "a"}])
    data, fmt = load_data(DataOptions(dataset=str(path), prompt_field="question", completion_field="answer"), tok)
    assert fmt == "prompt-completion" and list(data) == [{"prompt": "q", "completion": "a"}]
    text = write_jsonl(tmp_path / "body.jsonl", [{"body": "some text", "title": "t"}])
    data, fmt = load_data(DataOptions(dataset=str(text), text_field="body"), tok)
    assert fmt == "text" and list(data) == [{"text": "some text"}]


def test_text_sample_by_paragraph(tok, tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n")
    data, _ = load_data(DataOptions(dataset=str(tmp_path / "a.txt"), sample_by="paragraph"), tok)
    assert [r["text"].strip() for r in data] == ["one\ntwo", "three"]
    data, _ = load_data(DataOptions(dataset=str(tmp_path / "a.txt")), tok)
    assert [r["text"] for r in data] == ["one\ntwo\n\nthree\n"]  # one document per file


# -- mixing ----------------------------------------------------------------------------------------------------------


def test_mixing_probabilities():
    assert mixing_probabilities([3, 1]) == [0.75, 0.25]
    # by tokens: a source whose examples are 10× longer is sampled 10× less often for the same share of tokens
    assert mixing_probabilities([1, 1], [10.0, 100.0]) == pytest.approx([10 / 11, 1 / 11])


def test_mix_by_examples_follows_the_weights(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(400)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(400)])
    data, _ = load_data(DataOptions(dataset=[str(a), str(b)], weights=[3, 1]), tok)
    share = sum(r["text"].startswith("a") for r in data) / len(data)
    assert 0.70 < share < 0.80 and {r["text"] for r in data if r["text"].startswith("b")} == {f"b{i}" for i in range(400)}


def test_mix_by_tokens_follows_the_weights(tok, tmp_path):
    """Short and long documents 1:1 by tokens: each source gives about half of the tokens, though the short one gives
    most of the examples."""
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "s" * 8} for _ in range(300)])
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": "L" * 98} for _ in range(300)])
    data, _ = load_data(DataOptions(dataset=[str(short), str(long)], weights=[1, 1], mix_by="tokens"), tok)
    tokens = {"s": 0, "L": 0}
    for row in data:
        tokens[row["text"][0]] += len(tok(row["text"]).input_ids) + 1
    assert 0.45 < tokens["s"] / sum(tokens.values()) < 0.55
    assert sum(r["text"][0] == "s" for r in data) > 5 * sum(r["text"][0] == "L" for r in data)


def test_text_mixes_with_prompt_completion_but_not_with_chat(tok, tmp_path):
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain text"}])
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q", "completion": "A"}])
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}])
    data, fmt = load_data(DataOptions(dataset=[str(text), str(pc)]), tok)
    assert fmt == "prompt-completion" and list(data) == [{"prompt": "", "completion": "plain text"},
                                                         {"prompt": "Q", "completion": "A"}]
    # the lifted text still trains on every token after BOS
    lifted, _ = prepared(tmp_path, tok, data={"dataset": [str(text), str(pc)]})
    assert trained_text(tok, lifted[0]) == "plain text</s>"
    with pytest.raises(UserError, match="mixes formats that train differently .* is chat"):
        load_data(DataOptions(dataset=[str(text), str(chat)]), tok)


# -- end to end --------------------------------------------------------------------------------------------------------


def test_streaming_parquet_trains(tmp_path):
    Dataset.from_list([{"text": "streamed text " * 4}] * 40).to_parquet(str(tmp_path / "corpus.parquet"))
    options = tiny_options(tmp_path / "out", data={"dataset": str(tmp_path / "corpus.parquet"), "streaming": True,
                                                   "seq_length": 32}, optimization={"max_steps": 2})
    data, _ = load_data(options.data, char_tokenizer())
    assert type(data).__name__ == "IterableDataset"
    result = train(options)
    assert result.final["train_loss"] > 0 and (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_eval_dataset_logs_loss_and_perplexity(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(8)])
    options = tiny_options(tmp_path / "out", data={"dataset": str(path), "eval_dataset": str(path)},
                           output={"eval_steps": 2}, optimization={"max_steps": 3})
    result = train(options)
    steps = [step for step, _ in result.curve("eval_loss")]
    assert steps == [2, 3]  # every eval_steps, and at the end
    loss = result.final["eval_loss"]
    assert result.final["eval_perplexity"] == pytest.approx(torch.tensor(loss).exp().item())
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged if "eval_perplexity" in e] == [2, 3]


def test_tensorboard_event_files_in_the_output_dir(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(tiny_options(tmp_path / "out", output={"report_to": "tensorboard"}))
    (events,) = (tmp_path / "out").glob("runs/*/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    losses = [e.value for e in accumulator.Scalars("train/loss")]
    assert losses == pytest.approx([v for _, v in result.curve("loss")])
    assert (tmp_path / "out" / "metrics.jsonl").is_file() and (tmp_path / "out" / "loss.png").is_file()


@pytest.mark.parametrize("method", ["mora", "lora", "full"])
def test_dpo_with_any_method(tmp_path, method):
    records = [{"prompt": f"Q{i}:", "chosen": " yes", "rejected": " no"} for i in range(8)]
    path = write_jsonl(tmp_path / "pref.jsonl", records)
    options = tiny_options(tmp_path / "out", data={"dataset": str(path)}, adapter={"method": method},
                           optimization={"objective": "dpo", "max_steps": 4,
                                         "learning_rate": {"mora": 5e-2, "lora": 1e-2, "full": 1e-3}[method]})
    result = train(options)
    margins = [v for _, v in result.curve("rewards/margins")]
    assert len(margins) == 4 and margins[-1] > 0  # the chosen answer pulls ahead of the rejected one
    if method == "full":
        assert (tmp_path / "out" / "model.safetensors").is_file()
        return
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    prefix = "mora_M" if method == "mora" else "lora_"
    assert adapter and all(prefix in k for k in adapter) and any(t.abs().sum() > 0 for t in adapter.values())


def test_neftune_noise_is_on_while_training(tmp_path):
    from transformers import TrainerCallback

    seen = []

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append(len(model.get_input_embeddings()._forward_hooks))

    train(tiny_options(tmp_path / "out", optimization={"neftune_noise_alpha": 5.0, "max_steps": 2}), callbacks=[Probe()])
    assert seen and all(n >= 1 for n in seen)  # transformers' NEFTune hook on the embeddings
