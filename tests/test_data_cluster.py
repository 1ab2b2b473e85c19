"""ETRC's reading stage (moraft.data.cluster): embeddings, clusters and budgeted neighbours on constructed corpora
whose topics are known, with real scikit-learn, faiss, sentence-transformers and tiny transformers models."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
from datasets import Dataset
from sklearn.metrics import adjusted_rand_score, homogeneity_score

import moraft.data.cluster as cluster_module
from moraft.data.cluster import (
    ClusterOptions,
    assign_clusters,
    choose_neighbors,
    cluster_corpus,
    default_clusters,
    embed_documents,
    embedding_kind,
)
from moraft.errors import MissingPathError, UserError
from moraft.train.builtin import char_tokenizer

TOPICS = {
    "astronomy": "star galaxy telescope orbit planet nebula comet asteroid supernova cosmic solar eclipse".split(),
    "cooking": "recipe oven flour butter sugar bake dough knead simmer garlic onion sauce".split(),
    "law": "court judge statute contract plaintiff defendant appeal verdict jury attorney clause liability".split(),
}
FILLER = "the a of and in to is was with for on by".split()


def topic_corpus(documents: int = 60, seed: int = 0) -> tuple[Dataset, list[int]]:
    """A corpus of ``documents`` texts, topic i % 3 each, of varied lengths; and each row's topic."""
    rng = random.Random(seed)
    tokenizer = char_tokenizer()
    rows, topics = [], []
    for i in range(documents):
        topic = i % 3
        words = rng.choices(TOPICS[list(TOPICS)[topic]], k=rng.randint(8, 40)) + rng.choices(FILLER, k=8)
        rng.shuffle(words)
        text = " ".join(words)
        rows.append({"id": f"doc-{i}", "title": None, "text": text, "tokens": len(tokenizer(text)["input_ids"])})
        topics.append(topic)
    return Dataset.from_list(rows), topics


def test_tfidf_clusters_recover_the_topics():
    corpus, topics = topic_corpus()
    clustered = cluster_corpus(corpus, ClusterOptions(clusters=3, context_tokens=2000))
    assert clustered.column_names == ["id", "cluster", "neighbors"]
    assert clustered["id"] == corpus["id"]
    assert adjusted_rand_score(topics, clustered["cluster"]) == 1.0


def test_neighbors_are_same_cluster_nearest_first_within_budget_and_greedy():
    corpus, _ = topic_corpus(90)
    options = ClusterOptions(clusters=3, context_tokens=700, max_neighbors=4)
    clustered = cluster_corpus(corpus, options)
    vectors = embed_documents(corpus["text"], options)
    tokens, labels = np.array(corpus["tokens"]), np.array(clustered["cluster"])
    filled = cut_by_budget = 0
    for row, chosen in enumerate(clustered["neighbors"]):
        assert row not in chosen and len(set(chosen)) == len(chosen) <= options.max_neighbors
        assert all(labels[n] == labels[row] for n in chosen)
        similarity = vectors[chosen] @ vectors[row]
        assert np.all(np.diff(similarity) <= 1e-6), "nearest first"
        left = options.context_tokens - tokens[row] - tokens[chosen].sum()
        assert left >= 0
        # Greedy: a neighbour is left out only when the budget cannot take it or the list is full.
        if len(chosen) < options.max_neighbors:
            others = [n for n in np.flatnonzero(labels == labels[row]) if n != row and n not in chosen]
            assert all(tokens[n] > left for n in others)
            cut_by_budget += 1
        else:
            filled += 1
    assert filled and cut_by_budget  # both limits were reached somewhere: the checks above were not vacuous


def test_a_document_longer_than_the_budget_is_refused_by_id():
    corpus, _ = topic_corpus(12)
    longest = int(np.argmax(corpus["tokens"]))
    budget = corpus["tokens"][longest] - 1
    with pytest.raises(UserError, match=rf"'doc-{longest}' has {budget + 1} tokens.*context_tokens={budget}"):
        cluster_corpus(corpus, ClusterOptions(context_tokens=budget))
    with pytest.raises(UserError, match="--corpus.max_tokens"):
        cluster_corpus(corpus, ClusterOptions(context_tokens=budget))


def test_the_same_seed_gives_the_same_clusters_and_neighbours():
    corpus, _ = topic_corpus(45, seed=3)
    first = cluster_corpus(corpus, ClusterOptions(seed=7, context_tokens=500))
    again = cluster_corpus(corpus, ClusterOptions(seed=7, context_tokens=500))
    assert first.to_list() == again.to_list()
    assert any(first["neighbors"])


def test_small_and_empty_corpora():
    features = topic_corpus(3)[0].features
    empty = Dataset.from_dict({name: [] for name in features}, features=features)
    clustered = cluster_corpus(empty, ClusterOptions())
    assert len(clustered) == 0 and clustered.column_names == ["id", "cluster", "neighbors"]
    one, _ = topic_corpus(1)
    assert cluster_corpus(one, ClusterOptions()).to_list() == [{"id": "doc-0", "cluster": 0, "neighbors": []}]
    few, _ = topic_corpus(4)
    clustered = cluster_corpus(few, ClusterOptions(clusters=50))  # more clusters than documents: one each at most
    assert len(set(clustered["cluster"])) <= 4
    assert default_clusters(1) == 1 and default_clusters(5000) == 50 and default_clusters(50_000) == 159


def test_bad_input_is_one_clear_message(tmp_path):
    corpus, _ = topic_corpus(6)
    with pytest.raises(UserError, match="cluster.algorithm='hdbscan' is invalid; expected one of auto, kmeans, faiss"):
        cluster_corpus(corpus, ClusterOptions(algorithm="hdbscan"))
    with pytest.raises(UserError, match="cluster.context_tokens=0 is invalid"):
        cluster_corpus(corpus, ClusterOptions(context_tokens=0))
    with pytest.raises(MissingPathError, match="does not exist; expected tfidf"):
        embedding_kind(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="is not a model directory"):
        embedding_kind(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="does not load as a transformers model"):
        embed_documents(["a text"], ClusterOptions(embedding=str(tmp_path)))
    with pytest.raises(UserError, match="no tokens column"):
        cluster_corpus(corpus.remove_columns("tokens"), ClusterOptions())
    blank = Dataset.from_list([{"id": "x", "text": "!!", "tokens": 3}, {"id": "y", "text": "?", "tokens": 2}])
    with pytest.raises(UserError, match="found no words"):
        cluster_corpus(blank, ClusterOptions())


def test_causal_lm_embeddings_are_mean_pooled_unit_rows_that_ignore_padding(llama_dir):
    texts = ["a short one", "a much longer text that pads the short one in its batch", "third"]
    options = ClusterOptions(embedding=str(llama_dir), batch_size=3)
    assert embedding_kind(options.embedding) == "causal-lm"
    vectors = embed_documents(texts, options)
    assert vectors.shape == (3, 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    alone = embed_documents(texts[:1], options)  # no padding at all
    np.testing.assert_allclose(vectors[0], alone[0], atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)


@pytest.fixture(scope="module")
def sentence_transformers_dir(tmp_path_factory):
    """A tiny BERT (random weights, a WordPiece vocabulary of letters) saved as a sentence-transformers model."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.models import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("st")
    (root / "bert").mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789"]
    (root / "bert" / "vocab.txt").write_text("\n".join(vocab))
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    BertModel(config).save_pretrained(root / "bert")
    BertTokenizerFast(str(root / "bert" / "vocab.txt")).save_pretrained(root / "bert")
    encoder = Transformer(str(root / "bert"))
    st.SentenceTransformer(modules=[encoder, Pooling(32)], device="cpu").save(str(root / "model"))
    return root / "model"


def test_sentence_transformers_embeddings_are_unit_rows(sentence_transformers_dir):
    options = ClusterOptions(embedding=str(sentence_transformers_dir), batch_size=2)
    assert embedding_kind(options.embedding) == "sentence-transformers"
    corpus, _ = topic_corpus(9)
    vectors = embed_documents(corpus["text"], options)
    assert vectors.shape == (9, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    clustered = cluster_corpus(corpus, options)
    assert len(clustered) == 9 and any(clustered["neighbors"])


def test_faiss_finds_the_topics_as_kmeans_does():
    pytest.importorskip("faiss")
    corpus, topics = topic_corpus(90, seed=1)
    vectors = embed_documents(corpus["text"], ClusterOptions())
    for algorithm in ("kmeans", "faiss"):
        labels = assign_clusters(vectors, ClusterOptions(clusters=3, algorithm=algorithm))
        assert adjusted_rand_score(topics, labels) == 1.0, algorithm
    again = assign_clusters(vectors, ClusterOptions(clusters=3, algorithm="faiss"))
    np.testing.assert_array_equal(again, labels)  # seeded as k-means is


def test_faiss_requested_without_faiss_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    vectors = embed_documents(topic_corpus(9)[0]["text"], ClusterOptions())
    with pytest.raises(UserError, match="install faiss-cpu"):
        assign_clusters(vectors, ClusterOptions(clusters=3, algorithm="faiss"))


def test_a_large_corpus_takes_minibatch_kmeans_and_its_clusters_stay_on_one_topic(monkeypatch):
    from sklearn import cluster

    monkeypatch.setattr(cluster_module, "KMEANS_MAX_DOCUMENTS", 1000)  # "large", without minutes of data
    monkeypatch.setitem(sys.modules, "faiss", None)  # auto would take faiss when installed
    used = []
    real = cluster.MiniBatchKMeans
    monkeypatch.setattr(cluster, "MiniBatchKMeans", lambda **kw: used.append(kw) or real(**kw))
    corpus, topics = topic_corpus(3000, seed=2)
    clustered = cluster_corpus(corpus, ClusterOptions(max_neighbors=2, context_tokens=1000))
    assert used and len(set(clustered["cluster"])) > 3  # default_clusters(3000) = 39 clusters
    assert homogeneity_score(topics, clustered["cluster"]) > 0.99


def test_blocked_neighbour_search_equals_the_plain_one(monkeypatch):
    corpus, _ = topic_corpus(60, seed=4)
    vectors = embed_documents(corpus["text"], ClusterOptions())
    labels = assign_clusters(vectors, ClusterOptions(clusters=2))
    tokens = np.array(corpus["tokens"])
    plain = choose_neighbors(vectors, labels, tokens, 400, 3)
    monkeypatch.setattr(cluster_module, "SIMILARITY_BLOCK", 64)  # a few rows per block
    assert choose_neighbors(vectors, labels, tokens, 400, 3) == plain


def test_the_partitioned_ranking_of_a_big_cluster_is_the_head_of_the_full_sort():
    similarity = np.random.default_rng(0).standard_normal((5, 400)).round(1)  # rounded: many ties
    full = np.argsort(-similarity, axis=1, kind="stable")
    np.testing.assert_array_equal(cluster_module._nearest_first(similarity, 20), full[:, :20])


def test_every_option_has_its_help():
    import dataclasses
    import re

    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # as moraft's CLI does
    parser = ArgumentParser()
    parser.add_class_arguments(ClusterOptions, "cluster")
    text = " ".join(parser.format_help().split("options:")[1].split())  # past the usage line
    for field in dataclasses.fields(ClusterOptions):
        help_of = re.search(rf"--cluster\.{field.name} \S+ (.*?)\(type:", text).group(1)
        assert len(help_of) > 20 and "--cluster." not in help_of, field.name
