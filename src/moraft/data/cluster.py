"""ETRC's reading stage: cluster the corpus by similarity and extend each text's reading with its nearest neighbours.

ETRC ("Improving Domain Adaptation through Extended-Text Reading Comprehension", Jiang et al. 2024,
https://arxiv.org/abs/2401.07284) observes that domain texts such as abstracts are short, so a reading-comprehension
example built from one text carries little context. It clusters the corpus and lets each text's reading continue
with related texts from its cluster, up to a length budget. Its code, embedding model, clustering algorithm, cluster
count and budget were never published; what this module chooses instead, each a `ClusterOptions` field:

- embedding: TF-IDF (sublinear term frequency) reduced by truncated SVD and L2-normalized, i.e. latent semantic
  analysis: offline, model-free, and fast on a CPU. A local sentence-transformers directory or a local causal LM
  (mean-pooled last hidden states) can replace it.
- clusters: k-means on the normalized embeddings (Euclidean distance between unit vectors ranks as cosine
  similarity), with k ≈ √(n/2) by default, the classical rule of thumb. It balances the two costs that grow with n:
  k-means is O(n·k·d) per iteration and the neighbour search inside clusters of size about n/k is O(n·(n/k)·d).
- neighbours: inside the document's own cluster only (so no n × n similarity matrix is ever built), nearest first by
  cosine similarity, added greedily while the document's tokens plus its neighbours' tokens fit ``context_tokens``.

The stage returns only the choice (``cluster``, ``neighbors`` as corpus row indices); the build stage writes the
extended reading, the document's text followed by its neighbours' texts in this order.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..errors import MissingPathError, UserError
from ..train.options import _Group

if TYPE_CHECKING:
    from datasets import Dataset

EMBEDDINGS = ("tfidf",)  # besides a model directory
ALGORITHMS = ("auto", "kmeans", "faiss")
KMEANS_MAX_DOCUMENTS = 10_000
"""algorithm=auto: full k-means up to this many documents; above it faiss if installed, else MiniBatchKMeans."""
TFIDF_MAX_FEATURES = 2**18
"""The TF-IDF vocabulary's size cap (the most frequent terms): bounds its memory on a large corpus."""
SIMILARITY_BLOCK = 2**24
"""Similarities computed at once in the neighbour search (floats): 64 MiB, whatever a cluster's size."""
CANDIDATES = 256
"""The nearest documents of its cluster a document's neighbours are chosen from (16 × max_neighbors if more)."""
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json")


@dataclass
class ClusterOptions(_Group):
    """ETRC's reading stage: how documents are embedded and clustered, and how far each reading is extended."""

    GROUP: ClassVar[str] = "cluster"
    SHORTCUT: ClassVar[Optional[str]] = "embedding"

    embedding: str = "tfidf"
    """How documents are embedded: tfidf (TF-IDF and truncated SVD, offline and model-free), a sentence-transformers
    model, or a causal LM (its last hidden states, mean-pooled over the text's tokens): a local directory or a
    Hugging Face Hub model id (downloaded into the Hub cache on first use)."""
    dimensions: int = 128
    """tfidf: the SVD components (the embedding's size; fewer if the corpus has fewer documents or terms)."""
    clusters: Optional[int] = None
    """How many clusters; None: about sqrt(documents / 2). Never more than the documents."""
    algorithm: Literal["auto", "kmeans", "faiss"] = "auto"
    """kmeans (scikit-learn: KMeans, or MiniBatchKMeans above 10,000 documents), faiss (spherical k-means; needs
    faiss-cpu), or auto (KMeans up to 10,000 documents, above that faiss if installed, else MiniBatchKMeans)."""
    context_tokens: int = 2048
    """The reading budget in tokens: a document's own tokens plus its neighbours' stay within it (at least the
    longest document's tokens)."""
    max_neighbors: int = 8
    """The most neighbours added to one document's reading."""
    seed: int = 0
    """Seeds the SVD and k-means (the same seed and corpus give the same clusters)."""
    batch_size: int = 32
    """Model embeddings: texts per forward pass."""
    max_length: int = 512
    """Model embeddings: the tokens of each text the model reads (the rest is cut)."""

    def validate(self) -> None:
        for name, minimum in (("dimensions", 1), ("context_tokens", 1), ("max_neighbors", 0), ("batch_size", 1),
                              ("max_length", 1), ("seed", 0)):
            self._integer(name, minimum)
        if self.clusters is not None:
            self._integer("clusters", 1)
        self._choice("algorithm", ALGORITHMS)
        if not _hub_model(self.embedding):  # a Hub model is checked once downloaded (embed_documents)
            embedding_kind(self.embedding)


def _hub_model(embedding: str) -> bool:
    from ..models import is_hub_id

    return embedding not in EMBEDDINGS and not Path(embedding).exists() and is_hub_id(embedding)


def embedding_dir(embedding: str) -> Path:
    """The directory of a model ``embedding``: itself, or the snapshot of a Hub model id, downloaded by moraft's one
    loader (`moraft.models.resolve_model_dir`) when it is not in the Hub cache."""
    if _hub_model(embedding):
        from ..models import resolve_model_dir

        return resolve_model_dir(embedding, what="cluster.embedding")
    return Path(embedding)


def embedding_kind(embedding: str) -> Literal["tfidf", "sentence-transformers", "causal-lm"]:
    """Which embedder ``embedding`` names: ``tfidf``, or the kind of model in that directory.

    Args:
        embedding: ``"tfidf"``, a local model directory, or a Hub model id (downloaded: `embedding_dir`).

    Returns:
        ``"tfidf"``, ``"sentence-transformers"`` (the directory has ``modules.json`` or
        ``config_sentence_transformers.json``) or ``"causal-lm"`` (it has a transformers ``config.json``).

    Raises:
        MissingPathError: the directory does not exist.
        UserError: it holds neither kind of model.
    """
    if embedding in EMBEDDINGS:
        return "tfidf"
    path = embedding_dir(embedding)
    if not path.exists():
        raise MissingPathError(
            f"cluster.embedding={embedding!r} does not exist; expected tfidf, or a sentence-transformers or causal "
            "LM directory or Hugging Face Hub id"
        )
    if any((path / name).is_file() for name in SENTENCE_TRANSFORMERS_FILES):
        return "sentence-transformers"
    if (path / "config.json").is_file():
        return "causal-lm"
    raise UserError(
        f"cluster.embedding={embedding!r} is not a model directory (no modules.json or config.json); expected tfidf "
        "or a local sentence-transformers or causal LM directory"
    )


def embed_documents(texts: Sequence[str], options: ClusterOptions) -> np.ndarray:
    """Embed each text as one unit vector (a row of zeros for a text without a single term, under tfidf).

    Args:
        texts: the documents (a list, or a `datasets` column, which is read lazily).
        options: ``embedding`` picks the embedder; ``dimensions``, ``seed``, ``batch_size``, ``max_length`` tune it.

    Returns:
        A float32 array of shape (len(texts), d), each row L2-normalized.
    """
    options.validate()
    kind = embedding_kind(options.embedding)
    if len(texts) == 0:
        return np.zeros((0, options.dimensions if kind == "tfidf" else 0), dtype=np.float32)
    if kind == "tfidf":
        return _embed_tfidf(texts, options)
    if kind == "sentence-transformers":
        return _embed_sentence_transformers(texts, options, embedding_dir(options.embedding))
    return _embed_causal_lm(texts, options, embedding_dir(options.embedding))


def _embed_tfidf(texts: Sequence[str], options: ClusterOptions) -> np.ndarray:
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    # Sublinear tf: a term repeated 20 times is not 20 times as telling (Manning et al., IR book §6.4.1).
    vectorizer = TfidfVectorizer(sublinear_tf=True, max_features=TFIDF_MAX_FEATURES, dtype=np.float32)
    try:
        tfidf = vectorizer.fit_transform(tqdm(texts, desc="TF-IDF", unit="doc"))  # (n, terms), sparse
    except ValueError as error:  # "empty vocabulary; perhaps the documents only contain stop words"
        raise UserError(f"cluster.embedding='tfidf' found no words in the corpus ({error}); use a model embedding")
    components = min(options.dimensions, min(tfidf.shape) - 1)
    if components < 1:  # one document or one term: nothing to reduce
        return normalize(tfidf).toarray().astype(np.float32)
    svd = TruncatedSVD(n_components=components, random_state=options.seed)
    reduced = svd.fit_transform(tfidf)  # (n, components)
    return normalize(reduced).astype(np.float32)


def _embed_sentence_transformers(texts: Sequence[str], options: ClusterOptions, directory: Path) -> np.ndarray:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise UserError(
            f"cluster.embedding={options.embedding!r} is a sentence-transformers model; install sentence-transformers"
        ) from None
    try:
        model = SentenceTransformer(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"cluster.embedding={options.embedding!r} does not load as a sentence-transformers model: {message}"
        )
    model.max_seq_length = min(options.max_length, model.max_seq_length or options.max_length)
    vectors = model.encode(
        list(texts), batch_size=options.batch_size, normalize_embeddings=True, convert_to_numpy=True,
        show_progress_bar=True,
    )
    return np.asarray(vectors, dtype=np.float32)


def _embed_causal_lm(texts: Sequence[str], options: ClusterOptions, directory: Path) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        # AutoModel: the decoder without its LM head, whose output we do not need.
        model = AutoModel.from_pretrained(
            directory, dtype="auto" if device == "cuda" else torch.float32
        )
    except (OSError, ValueError, KeyError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cluster.embedding={options.embedding!r} does not load as a transformers model: {message}")
    model = model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # left padding would shift the positions of a causal LM's real tokens
    # Batches of similar lengths waste less on padding; the output goes back to the input's order.
    lengths = [len(text) for text in texts]
    order = np.argsort(lengths, kind="stable")
    vectors = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), options.batch_size), desc="embedding", unit="batch"):
            rows = order[start : start + options.batch_size]
            batch = tokenizer(
                [texts[int(i)] for i in rows], padding=True, truncation=True, max_length=options.max_length,
                return_tensors="pt",
            ).to(device)
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, hidden)
            vectors[rows] = torch.nn.functional.normalize(mean.float(), dim=-1).cpu().numpy()
    return vectors


def default_clusters(documents: int) -> int:
    """The cluster count when none is given: ⌈√(documents / 2)⌉, at least 1 (see the module docstring).

    Args:
        documents: the corpus size.
    """
    return max(1, math.ceil(math.sqrt(documents / 2)))


def assign_clusters(vectors: np.ndarray, options: ClusterOptions) -> np.ndarray:
    """The k-means cluster of each row of ``vectors``, by ``options.algorithm``.

    Args:
        vectors: (n, d) float32 unit rows, from `embed_documents`.
        options: ``clusters`` (None: `default_clusters`, and never more than n), ``algorithm`` and ``seed``.

    Returns:
        An int64 array of n labels in [0, k).
    """
    options.validate()
    documents = len(vectors)
    if documents == 0:
        return np.zeros(0, dtype=np.int64)
    clusters = min(options.clusters or default_clusters(documents), documents)
    if clusters == 1:
        return np.zeros(documents, dtype=np.int64)
    algorithm = options.algorithm
    if algorithm == "auto":
        algorithm = "kmeans" if documents <= KMEANS_MAX_DOCUMENTS or not _faiss_installed() else "faiss"
    if algorithm == "faiss":
        return _faiss_kmeans(vectors, clusters, options.seed)
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if documents <= KMEANS_MAX_DOCUMENTS:
        kmeans = KMeans(n_clusters=clusters, random_state=options.seed)
    else:
        kmeans = MiniBatchKMeans(n_clusters=clusters, batch_size=4096, random_state=options.seed)
    return kmeans.fit_predict(vectors).astype(np.int64)


def _faiss_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


def _faiss_kmeans(vectors: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    try:
        import faiss
    except ImportError:
        raise UserError("cluster.algorithm='faiss' needs faiss; install faiss-cpu (or use kmeans)") from None
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    # Spherical: centroids renormalized each iteration, so assignment is by cosine similarity, as the neighbours are.
    # min_points_per_centroid=1: faiss would warn below 39 points a centroid, which a small corpus is, harmlessly.
    kmeans = faiss.Kmeans(
        vectors.shape[1], clusters, niter=25, nredo=3, seed=seed, spherical=True, min_points_per_centroid=1
    )
    kmeans.train(vectors)
    _, labels = kmeans.index.search(vectors, 1)  # (n, 1) nearest centroid
    return labels[:, 0].astype(np.int64)


def choose_neighbors(
    vectors: np.ndarray, labels: np.ndarray, tokens: np.ndarray, context_tokens: int, max_neighbors: int
) -> list[list[int]]:
    """For each document, its nearest documents of the same cluster that fit its reading budget, nearest first.

    Candidates are the nearest `CANDIDATES` documents of the cluster (or 16 × ``max_neighbors``), taken in order of
    cosine similarity (ties: the lower row first); each one is added if its tokens fit what the budget has left, and
    skipped otherwise, until ``max_neighbors`` are chosen or nothing else fits.

    Args:
        vectors: (n, d) unit rows.
        labels: (n,) cluster of each row.
        tokens: (n,) token count of each document.
        context_tokens: the budget for a document's tokens plus its neighbours'.
        max_neighbors: the most neighbours per document.

    Returns:
        n lists of row indices, never the document itself.
    """
    neighbors: list[list[int]] = [[] for _ in range(len(labels))]
    if max_neighbors == 0:
        return neighbors
    members_of = np.split(np.argsort(labels, kind="stable"), np.flatnonzero(np.diff(np.sort(labels))) + 1)
    with tqdm(total=len(labels), desc="neighbours", unit="doc") as progress:
        for members in members_of:  # (m,) rows of one cluster, ascending
            _cluster_neighbors(vectors, tokens, members, context_tokens, max_neighbors, neighbors)
            progress.update(len(members))
    return neighbors


def _cluster_neighbors(
    vectors: np.ndarray, tokens: np.ndarray, members: np.ndarray, budget: int, max_neighbors: int,
    neighbors: list[list[int]],
) -> None:
    size = len(members)
    if size < 2:
        return
    inside = vectors[members]  # (m, d)
    member_tokens = tokens[members]
    smallest = int(member_tokens.min())
    block = max(1, SIMILARITY_BLOCK // size)
    for start in range(0, size, block):
        rows = np.arange(start, min(start + block, size))
        similarity = inside[rows] @ inside.T  # (b, m)
        similarity[np.arange(len(rows)), rows] = -np.inf  # never itself
        ranked = _nearest_first(similarity, min(size - 1, max(CANDIDATES, 16 * max_neighbors)))  # (b, c)
        head = ranked[:, :max_neighbors]  # (b, k)
        lefts = budget - member_tokens[rows]  # (b,)
        # Where the k nearest fit together, greedy takes exactly them: no loop over candidates for those rows.
        all_fit = member_tokens[head].sum(axis=1) <= lefts
        for row, candidates, left, fit in zip(rows, ranked, lefts.tolist(), all_fit):
            chosen = neighbors[int(members[row])]
            if fit:
                chosen.extend(members[candidates[:max_neighbors]].tolist())
                continue
            for candidate in candidates:
                if len(chosen) == max_neighbors or left < smallest:
                    break
                needed = int(member_tokens[candidate])
                if needed <= left:
                    chosen.append(int(members[candidate]))
                    left -= needed


def _nearest_first(similarity: np.ndarray, count: int) -> np.ndarray:
    """The column indices of each row's ``count`` largest similarities, largest first (ties: lower index first)."""
    if count * 4 < similarity.shape[1]:
        # A big cluster's full sort would cost m log m per document: partition first, then sort only the top.
        # Ties at the cut are broken by index here too, as a full stable sort would (argpartition picks any).
        threshold = np.partition(similarity, -count, axis=1)[:, -count]  # (b,) the count-th largest
        ranked = np.empty((len(similarity), count), dtype=np.int64)
        for row, (values, cut) in enumerate(zip(similarity, threshold)):
            above = np.flatnonzero(values > cut)
            top = np.sort(np.concatenate([above, np.flatnonzero(values == cut)[: count - len(above)]]))
            ranked[row] = top[np.argsort(-values[top], kind="stable")]
        return ranked
    return np.argsort(-similarity, axis=1, kind="stable")[:, :count]


def cluster_corpus(corpus: Dataset, options: ClusterOptions) -> Dataset:
    """Cluster the corpus and choose each document's reading extension.

    Args:
        corpus: the corpus dataset (``id``, ``text`` and ``tokens`` columns).
        options: the stage's options.

    Returns:
        One row per corpus row, in order: ``id``, ``cluster`` (int) and ``neighbors`` (corpus row indices of the
        documents that extend its reading, nearest first, from the same cluster, never itself, their tokens and its
        own within ``options.context_tokens``).

    Raises:
        UserError: a document is longer than the budget, the corpus lacks a column, or an option is invalid.
    """
    from datasets import Dataset, Features, List, Value

    options.validate()
    missing = [column for column in ("id", "text", "tokens") if column not in corpus.column_names]
    if missing:
        raise UserError(f"the corpus has no {', '.join(missing)} column; expected the corpus stage's output")
    features = Features({"id": Value("string"), "cluster": Value("int64"), "neighbors": List(Value("int64"))})
    tokens = np.asarray(corpus["tokens"], dtype=np.int64)
    if len(tokens) and tokens.max() > options.context_tokens:
        row = int(np.argmax(tokens > options.context_tokens))
        raise UserError(
            f"document {corpus[row]['id']!r} has {tokens[row]} tokens, more than cluster.context_tokens="
            f"{options.context_tokens}; raise --cluster.context_tokens to at least {tokens.max()} or cut texts "
            "shorter (--corpus.max_tokens)"
        )
    vectors = embed_documents(corpus["text"], options)
    labels = assign_clusters(vectors, options)
    neighbors = choose_neighbors(vectors, labels, tokens, options.context_tokens, options.max_neighbors)
    return Dataset.from_dict(
        {"id": list(corpus["id"]), "cluster": labels.tolist(), "neighbors": neighbors}, features=features
    )


__all__ = ["ClusterOptions", "assign_clusters", "choose_neighbors", "cluster_corpus", "default_clusters",
           "embed_documents", "embedding_kind"]
