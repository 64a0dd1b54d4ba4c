"""The demo recommender: the reference workload of BENCHMARK.md, from a fixed seed.

Per row: 13 dense floats, 26 categorical int64 ids hashed (mod ``table_rows``) into one
table each, and a variable-length history of ids mean-pooled through its own table; an MLP
(877 -> 1024 -> 512 -> 256 -> 1, ReLU, sigmoid) scores the row. The weights come from numpy
with a seed, so the TensorFlow and PyTorch builds compute the same function; ``reference``
is the numpy float64 version both are checked against.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mpsserve.model.runtime.base import Signature, TensorSpec, write_signature_file
from mpsserve.model.split import MANIFEST_FILE
from mpsserve.model.warmup import MAX_RECORDS, WARMUP_FILE
from mpsserve.protocol.tfrecord import write_records
from mpsserve.protocol.tfserving_grpc import warmup_record

logger = logging.getLogger(__name__)
ID_MAX = 2**31 - 1  # ids on the wire are non-negative hashes


@dataclass(frozen=True)
class DemoSpec:
    """Sizes of the demo model; the defaults are the reference workload."""

    n_dense: int = 13
    n_cat: int = 26
    table_rows: int = 100_000
    dim: int = 32
    hidden: tuple[int, ...] = (1024, 512, 256)
    history_mean: int = 20

    @property
    def mlp_input(self) -> int:
        return self.n_dense + self.n_cat * self.dim + self.dim


@dataclass
class DemoWeights:
    cat_tables: np.ndarray  # [n_cat * table_rows, dim]: table i starts at row i * table_rows
    history_table: np.ndarray  # [table_rows, dim]
    layers: list[tuple[np.ndarray, np.ndarray]]  # (W [in, out], b [out]) per layer


def make_weights(spec: DemoSpec, seed: int) -> DemoWeights:
    """Random weights from ``seed``, scaled so scores neither saturate nor collapse to 0.5."""
    rng = np.random.default_rng(seed)
    tables = rng.standard_normal((spec.n_cat * spec.table_rows, spec.dim), dtype=np.float32)
    history = rng.standard_normal((spec.table_rows, spec.dim), dtype=np.float32)
    tables *= 0.5
    history *= 0.5
    layers = []
    sizes = (spec.mlp_input, *spec.hidden, 1)
    for fan_in, fan_out in itertools.pairwise(sizes):
        bound = np.sqrt(6.0 / fan_in)  # He: keeps the signal alive through the ReLUs
        w = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)
        b = rng.uniform(-0.01, 0.01, fan_out).astype(np.float32)
        layers.append((w, b))
    return DemoWeights(tables, history, layers)


def demo_tables(spec: DemoSpec, seed: int) -> dict[str, np.ndarray]:
    """The demo's embedding tables by the names the embedding store publishes them under:
    ``cat`` (the 26 categorical tables stacked, table i from row i * table_rows, as the
    model adds its offsets) and ``history``."""
    weights = make_weights(spec, seed)
    return {"cat": weights.cat_tables, "history": weights.history_table}


class ZipfIds:
    """Ids whose popularity follows Zipf's law, as recommendation traffic's does: the id of
    popularity rank ``r`` (1-based, of ``distinct``) is drawn with probability proportional
    to ``r ** -exponent``. Ranks map to ids through a fixed bijection of [0, ID_MAX), so hot
    ids are scattered over the id space (and over a store's shards) rather than 0, 1, 2...
    Drawing is an inverse-CDF lookup: ``searchsorted`` on the cumulative weights."""

    def __init__(self, distinct: int, exponent: float = 1.05) -> None:
        if not 1 <= distinct <= ID_MAX or exponent <= 0:
            raise ValueError(f"need 1 <= distinct <= {ID_MAX} and exponent > 0")
        weights = np.arange(1, distinct + 1, dtype=np.float64) ** -exponent
        self.cdf = np.cumsum(weights / weights.sum())
        self.cdf[-1] = 1.0  # no rounding gap at the top

    def share_of_top(self, ranks: int) -> float:
        """The expected share of draws that fall on the ``ranks`` hottest ids."""
        return float(self.cdf[min(ranks, len(self.cdf)) - 1])

    def draw(self, rng: np.random.Generator, shape: int | tuple[int, ...]) -> np.ndarray:
        ranks = np.searchsorted(self.cdf, rng.random(shape), side="right")
        return rank_to_id(ranks)


def rank_to_id(ranks: np.ndarray) -> np.ndarray:
    """A bijection of [0, ID_MAX) (ID_MAX = 2**31 - 1 is prime: multiplying by a unit mod a
    prime permutes the non-zero residues), so distinct ranks stay distinct ids."""
    return ((ranks.astype(np.int64) + 1) * _ID_MULTIPLIER % ID_MAX - 1).astype(np.int64)


_ID_MULTIPLIER = 48271  # a primitive root mod 2**31 - 1 (Park-Miller): products fit in int64


def make_request(
    spec: DemoSpec, rows: int = 2000, seed: int = 0, ids: ZipfIds | None = None
) -> dict[str, np.ndarray]:
    """A reproducible request of the reference workload (history lengths 1..39, mean 20);
    ids uniform over [0, ID_MAX), or drawn from ``ids`` (popularity-skewed, for caches)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 2 * spec.history_mean, rows, dtype=np.int64)

    def draw(shape: int | tuple[int, ...]) -> np.ndarray:
        if ids is None:
            return rng.integers(0, ID_MAX, shape, dtype=np.int64)
        return ids.draw(rng, shape)

    return {
        "dense": rng.standard_normal((rows, spec.n_dense), dtype=np.float32),
        "cat": draw((rows, spec.n_cat)),
        "history_values": draw(int(lengths.sum())),
        "history_lengths": lengths,
    }


def signature(spec: DemoSpec) -> Signature:
    """The demo's serving signature (inputs in the order the torch program takes them)."""
    ids = {"dtype": "int64", "min_value": 0, "max_value": ID_MAX}
    return Signature.from_dict(
        {
            "inputs": [
                {"name": "dense", "dtype": "float32", "shape": [-1, spec.n_dense]},
                {"name": "cat", "shape": [-1, spec.n_cat], **ids},
                {"name": "history_values", "shape": [-1], **ids},
                {"name": "history_lengths", "dtype": "int64", "shape": [-1], "min_value": 0},
            ],
            "outputs": [{"name": "score", "dtype": "float32", "shape": [-1]}],
        }
    )


def dnn_signature(spec: DemoSpec) -> Signature:
    """The split build's DNN: the dense features and the pooled embeddings (``embeddings.json``
    says how the served signature's ids become them)."""
    return Signature.from_dict(
        {
            "inputs": [
                {"name": "dense", "dtype": "float32", "shape": [-1, spec.n_dense]},
                {"name": "cat_emb", "dtype": "float32", "shape": [-1, spec.n_cat * spec.dim]},
                {"name": "history_emb", "dtype": "float32", "shape": [-1, spec.dim]},
            ],
            "outputs": [{"name": "score", "dtype": "float32", "shape": [-1]}],
        }
    )


def split_manifest(spec: DemoSpec, embedding_version: str) -> dict[str, object]:
    """The split build's ``embeddings.json``: the tables ``demo_tables`` publishes, hashed as
    the monolithic model hashes its ids."""
    common = {"hash_buckets": spec.table_rows, "min_value": 0, "max_value": ID_MAX}
    return {
        "embedding_version": embedding_version,
        "features": [
            {"input": "cat", "table": "cat", "output": "cat_emb", "combiner": "concat",
             "column_stride": spec.table_rows, **common},
            {"input": "history", "ragged": True, "table": "history", "output": "history_emb",
             "combiner": "mean", **common},
        ],
    }  # fmt: skip


def reference(spec: DemoSpec, w: DemoWeights, request: dict[str, np.ndarray]) -> np.ndarray:
    """The model in numpy float64: the ground truth for both framework builds."""
    rows = request["dense"].shape[0]
    offsets = np.arange(spec.n_cat) * spec.table_rows
    cat = w.cat_tables[request["cat"] % spec.table_rows + offsets].reshape(rows, -1)
    lengths = request["history_lengths"]
    segments = np.repeat(np.arange(rows), lengths)
    pooled = np.zeros((rows, spec.dim))
    np.add.at(pooled, segments, w.history_table[request["history_values"] % spec.table_rows])
    pooled /= np.maximum(lengths, 1)[:, None]
    x = np.concatenate([request["dense"], cat, pooled], axis=1).astype(np.float64)
    for i, (weight, bias) in enumerate(w.layers):
        x = x @ weight + bias
        x = np.maximum(x, 0) if i < len(w.layers) - 1 else x
    return (1 / (1 + np.exp(-x[:, 0]))).astype(np.float32)


def _tf_mlp(tf: Any, layers: list[tuple[Any, Any]], x: Any) -> Any:
    """The MLP's score (ReLU between layers, sigmoid at the end), in TensorFlow."""
    for i, (weight, bias) in enumerate(layers):
        x = tf.matmul(x, weight) + bias
        x = tf.nn.relu(x) if i < len(layers) - 1 else x
    return tf.sigmoid(x[:, 0])


def _torch_linears(torch: Any, w: DemoWeights) -> Any:
    """The MLP's layers as a ``ModuleList`` of ``Linear`` with the demo's weights."""
    linears = torch.nn.ModuleList()
    for a, b in w.layers:
        linear = torch.nn.Linear(a.shape[0], a.shape[1])
        linear.weight.data = torch.from_numpy(np.ascontiguousarray(a.T))
        linear.bias.data = torch.from_numpy(b)
        linears.append(linear)
    return linears


def _torch_mlp(torch: Any, linears: Any, x: Any) -> Any:
    """The MLP's score, in PyTorch (as ``_tf_mlp``)."""
    for i, linear in enumerate(linears):
        x = linear(x)
        x = torch.relu(x) if i < len(linears) - 1 else x
    return torch.sigmoid(x[:, 0])


def build_tensorflow(spec: DemoSpec, w: DemoWeights, out: Path) -> None:
    """Write a SavedModel whose ``serving_default`` takes the history as values + lengths."""
    from mpsserve.model.runtime.tensorflow import tf

    class Recommender(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cat_tables = tf.Variable(w.cat_tables, trainable=False, name="cat_tables")
            self.history = tf.Variable(w.history_table, trainable=False, name="history")
            self.layers = [(tf.Variable(a), tf.Variable(b)) for a, b in w.layers]
            self.offsets = tf.constant(np.arange(spec.n_cat, dtype=np.int64) * spec.table_rows)

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, spec.n_dense], tf.float32, name="dense"),
                tf.TensorSpec([None, spec.n_cat], tf.int64, name="cat"),
                tf.TensorSpec([None], tf.int64, name="history_values"),
                tf.TensorSpec([None], tf.int64, name="history_lengths"),
            ]
        )
        def serve(self, dense, cat, history_values, history_lengths):  # type: ignore[no-untyped-def]
            rows = tf.shape(dense)[0]
            ids = tf.math.floormod(cat, spec.table_rows) + self.offsets
            cat_emb = tf.reshape(tf.gather(self.cat_tables, ids), [rows, spec.n_cat * spec.dim])
            segments = tf.repeat(tf.range(rows), history_lengths)
            hist = tf.gather(self.history, tf.math.floormod(history_values, spec.table_rows))
            pooled = tf.math.unsorted_segment_sum(hist, segments, rows)
            count = tf.cast(tf.maximum(history_lengths, 1), tf.float32)[:, None]
            x = tf.concat([dense, cat_emb, pooled / count], axis=1)
            return {"score": _tf_mlp(tf, self.layers, x)}

    module = Recommender()
    tf.saved_model.save(module, str(out), signatures={"serving_default": module.serve})


def build_torch(spec: DemoSpec, w: DemoWeights, out: Path) -> None:
    """Write a ``torch.export`` program with dynamic row and history-value counts."""
    import torch

    class Recommender(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cat_tables = torch.nn.Embedding.from_pretrained(torch.from_numpy(w.cat_tables))
            self.history = torch.nn.EmbeddingBag.from_pretrained(
                torch.from_numpy(w.history_table), mode="sum"
            )
            offsets = torch.arange(spec.n_cat, dtype=torch.int64) * spec.table_rows
            self.register_buffer("offsets", offsets)
            self.linears = _torch_linears(torch, w)

        def forward(self, dense, cat, history_values, history_lengths):  # type: ignore[no-untyped-def]
            ids = torch.remainder(cat, spec.table_rows) + self.offsets
            cat_emb = self.cat_tables(ids).flatten(1)
            starts = torch.cumsum(history_lengths, 0) - history_lengths
            pooled = self.history(torch.remainder(history_values, spec.table_rows), starts)
            pooled = pooled / history_lengths.clamp(min=1).unsqueeze(1).to(pooled.dtype)
            x = torch.cat([dense, cat_emb, pooled], dim=1)
            return _torch_mlp(torch, self.linears, x)

    request = make_request(spec, rows=4)
    example = tuple(torch.from_numpy(request[s.name]) for s in signature(spec).inputs)
    rows, values = torch.export.Dim("rows"), torch.export.Dim("values")
    dynamic = {
        "dense": {0: rows},
        "cat": {0: rows},
        "history_values": {0: values},
        "history_lengths": {0: rows},
    }
    program = torch.export.export(
        Recommender().eval(), example, dynamic_shapes=dynamic, strict=False
    )
    torch.export.save(program, str(out / "model.pt2"))


def build_tensorflow_dnn(spec: DemoSpec, w: DemoWeights, out: Path) -> None:
    """The split build's DNN as a SavedModel (``dnn_signature``): the MLP alone."""
    from mpsserve.model.runtime.tensorflow import tf

    class Dnn(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = [(tf.Variable(a), tf.Variable(b)) for a, b in w.layers]

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, spec.n_dense], tf.float32, name="dense"),
                tf.TensorSpec([None, spec.n_cat * spec.dim], tf.float32, name="cat_emb"),
                tf.TensorSpec([None, spec.dim], tf.float32, name="history_emb"),
            ]
        )
        def serve(self, dense, cat_emb, history_emb):  # type: ignore[no-untyped-def]
            x = tf.concat([dense, cat_emb, history_emb], axis=1)
            return {"score": _tf_mlp(tf, self.layers, x)}

    module = Dnn()
    tf.saved_model.save(module, str(out), signatures={"serving_default": module.serve})


def build_torch_dnn(spec: DemoSpec, w: DemoWeights, out: Path) -> None:
    """The split build's DNN as a ``torch.export`` program (``dnn_signature``)."""
    import torch

    class Dnn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linears = _torch_linears(torch, w)

        def forward(self, dense, cat_emb, history_emb):  # type: ignore[no-untyped-def]
            x = torch.cat([dense, cat_emb, history_emb], dim=1)
            return _torch_mlp(torch, self.linears, x)

    rows = torch.export.Dim("rows")
    example = tuple(torch.zeros((4, s.shape[1])) for s in dnn_signature(spec).inputs)
    dynamic = {name: {0: rows} for name in ("dense", "cat_emb", "history_emb")}
    program = torch.export.export(Dnn().eval(), example, dynamic_shapes=dynamic, strict=False)
    torch.export.save(program, str(out / "model.pt2"))


def write_demo_model(
    out: Path,
    fmt: Literal["tensorflow", "torch"],
    version: int = 1,
    seed: int = 0,
    spec: DemoSpec | None = None,
    warmup_requests: int = 0,
    split: str | None = None,
) -> Path:
    """Build the demo into ``out/<version>/``; the version appears only when complete.
    ``warmup_requests``: that many requests in a TF Serving warm-up file (either format).
    ``split``: an embedding version tag; the build is then the DNN alone with an
    ``embeddings.json`` naming that version (publish its tables with ``mpsserve embeddings
    publish --model-dir``), serving the same scores as the monolithic build."""
    spec = spec or DemoSpec()
    if not 0 <= warmup_requests <= MAX_RECORDS:
        raise ValueError(f"warm-up requests must be 0..{MAX_RECORDS} (TF Serving's limit)")
    final = out / str(version)
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    staging = out / f".{version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    logger.info("building demo model (%s, seed %d) in %s", fmt, seed, final)
    weights = make_weights(spec, seed)
    if split is None:
        (build_tensorflow if fmt == "tensorflow" else build_torch)(spec, weights, staging)
        write_signature_file(staging, signature(spec))
    else:
        (build_tensorflow_dnn if fmt == "tensorflow" else build_torch_dnn)(spec, weights, staging)
        write_signature_file(staging, dnn_signature(spec))
        manifest = json.dumps(split_manifest(spec, split), indent=2) + "\n"
        (staging / MANIFEST_FILE).write_text(manifest)
    about = {"seed": seed, "format": fmt, "split": split, **asdict(spec)}
    (staging / "demo.json").write_text(json.dumps(about, indent=2) + "\n")
    if warmup_requests:
        write_warmup_file(staging, spec, warmup_requests)
    staging.rename(final)
    return final


#: Rows of the demo's warm-up requests, in turn: the reference size, then smaller ones.
WARMUP_ROWS = (2000, 256, 32)


def write_warmup_file(version_dir: Path, spec: DemoSpec, count: int) -> Path:
    """TF Serving's ``assets.extra/tf_serving_warmup_requests`` in ``version_dir``: ``count``
    PredictionLog records of demo requests (rows from ``WARMUP_ROWS`` in turn)."""
    if not 0 < count <= MAX_RECORDS:
        raise ValueError(f"warm-up requests must be 1..{MAX_RECORDS} (TF Serving's limit)")
    path = version_dir / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    records = (
        warmup_record(make_request(spec, WARMUP_ROWS[i % len(WARMUP_ROWS)], seed=1000 + i))
        for i in range(count)
    )
    write_records(path, records)
    return path


__all__ = ["DemoSpec", "TensorSpec", "make_request", "reference", "write_demo_model"]
