"""Split models: a DNN in the version directory, its embeddings in the embedding store.

A version directory that holds ``embeddings.json`` beside its DNN (a SavedModel or a PyTorch
program, as any version) is a split model. The file names the embedding version the DNN was
trained with and, per embedding feature, which request input carries its ids, which table of
the store holds its rows, how ids become table ids, and which DNN input receives the rows::

    {
      "embedding_version": "rec-2026-12-02T0100",
      "features": [
        {"input": "cat", "table": "cat", "output": "cat_emb", "combiner": "concat",
         "hash_buckets": 100000, "column_stride": 100000, "min_value": 0},
        {"input": "history", "ragged": true, "table": "history", "output": "history_emb",
         "combiner": "mean", "hash_buckets": 100000, "min_value": 0}
      ]
    }

Clients send ids as they would to the monolithic model: the served signature is the DNN's,
with each feature's ``output`` replaced by its ids input (``<input>`` [rows, columns], or the
ragged pair ``<input>_values`` / ``<input>_lengths``). ``SplitRuntime`` looks the ids up
(``mpsserve.embeddings.lookup``: de-duplicated, node cache, store), pools them as the
feature's ``combiner`` says, and runs the DNN on the result.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mpsserve import metrics
from mpsserve.config import field_errors
from mpsserve.embeddings.layout import NAME
from mpsserve.embeddings.lookup import Counts, EmbeddingLookup, EmbeddingTier
from mpsserve.errors import EmbeddingStoreError, ModelLoadError
from mpsserve.model.runtime.base import ModelRuntime, Signature, TensorSpec
from mpsserve.types import LENGTHS_SUFFIX, VALUES_SUFFIX

MANIFEST_FILE = "embeddings.json"


class EmbeddingFeature(BaseModel):
    """One embedding feature of a split model (see the module's docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
        description="Request input of the ids: [rows, columns] int64, or with ragged the "
        "feature whose <input>_values / <input>_lengths carry them.",
    )
    ragged: bool = False
    table: str = Field(pattern=NAME.pattern, description="Table in the embedding store.")
    output: str = Field(description="DNN input that receives the looked-up rows.")
    combiner: Literal["concat", "sum", "mean"] = Field(
        "concat",
        description="concat: [rows, columns x dim] (dense ids only); sum, mean: [rows, dim] "
        "over a row's ids (mean of no ids is zeros).",
    )
    hash_buckets: int | None = Field(
        None, ge=1, description="Table id = id mod hash_buckets (+ column x column_stride)."
    )
    column_stride: int = Field(0, ge=0, description="Offset between columns' tables.")
    min_value: int | None = Field(None, description="Smallest id a request may send.")
    max_value: int | None = Field(None, description="Largest id a request may send.")

    @model_validator(mode="after")
    def _combiner_fits(self) -> EmbeddingFeature:
        if self.ragged and self.combiner == "concat":
            raise ValueError(f"feature {self.input}: a ragged feature pools with sum or mean")
        return self

    def id_inputs(self, columns: int) -> list[TensorSpec]:
        """What clients send for this feature (``columns``: -1 where any number goes)."""
        low, high = self.min_value, self.max_value
        if self.ragged:
            return [
                TensorSpec(
                    self.input + VALUES_SUFFIX, "int64", (-1,), min_value=low, max_value=high
                ),
                TensorSpec(self.input + LENGTHS_SUFFIX, "int64", (-1,), min_value=0),
            ]
        return [TensorSpec(self.input, "int64", (-1, columns), min_value=low, max_value=high)]

    def table_ids(self, ids: np.ndarray) -> np.ndarray:
        """Request ids -> the table's ids (hashed, each column offset)."""
        if self.hash_buckets is not None:
            ids = np.mod(ids, self.hash_buckets)
        if self.column_stride and ids.ndim == 2:
            ids = ids + np.arange(ids.shape[1], dtype=np.int64) * self.column_stride
        return ids

    def pooled(self, rows: np.ndarray, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Looked-up rows -> the DNN's input, float32."""
        if not self.ragged:  # rows: [batch, columns, dim]
            if self.combiner == "concat":
                return rows.reshape(rows.shape[0], -1)
            pooled = rows.sum(axis=1) if self.combiner == "sum" else rows.mean(axis=1)
            return pooled.astype(np.float32)
        lengths = inputs[self.input + LENGTHS_SUFFIX]
        return pool_segments(rows, lengths, self.combiner == "mean")


def pool_segments(values: np.ndarray, lengths: np.ndarray, mean: bool) -> np.ndarray:
    """Sum (or mean) of consecutive runs of ``values`` [n, dim], ``lengths`` [rows] long
    (adding up to n); an empty run gives zeros."""
    out = np.zeros((len(lengths), values.shape[1]), dtype=np.float32)
    present = np.flatnonzero(lengths > 0)
    if len(present):
        starts = (np.cumsum(lengths) - lengths)[present]
        out[present] = np.add.reduceat(values, starts, axis=0, dtype=np.float64)
    if mean:
        out /= np.maximum(lengths, 1)[:, None]
    return out


class SplitManifest(BaseModel):
    """``embeddings.json``: the embedding version and the features (module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embedding_version: str = Field(pattern=NAME.pattern)
    features: list[EmbeddingFeature] = Field(min_length=1)
    follow_updates: bool = Field(
        True,
        description="Serve the newest delta published on top of embedding_version (mpsserve "
        "embeddings publish --base), checked at every poll of the model store; false: "
        "embedding_version alone.",
    )

    @classmethod
    def read(cls, version_dir: Path) -> SplitManifest | None:
        """The manifest of ``version_dir``, None for a monolithic model; a broken file is a
        ModelLoadError naming it and the field."""
        path = version_dir / MANIFEST_FILE
        if not path.exists():
            return None
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            detail = field_errors(exc)[0] if isinstance(exc, ValidationError) else str(exc)
            raise ModelLoadError(f"{path} is not a valid split-model manifest: {detail}") from exc

    def embed(
        self, lookup: EmbeddingLookup, inputs: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, Counts]]:
        """Each feature's pooled rows from ``lookup``, by the DNN input they go to, and per
        table the counts (distinct ids, node-cache hits, fetched from the store)."""
        pooled: dict[str, np.ndarray] = {}
        counts: dict[str, Counts] = {}
        for feature in self.features:
            ids = inputs[feature.input + VALUES_SUFFIX if feature.ragged else feature.input]
            rows, counted = lookup.rows(feature.table, feature.table_ids(ids))
            counts[feature.table] = _added(counts.get(feature.table), counted)
            pooled[feature.output] = feature.pooled(rows, inputs)
        return pooled, counts

    def signature(self, dnn: Signature, dims: Mapping[str, int]) -> Signature:
        """The served signature: the DNN's, each feature's output replaced by its ids (a
        concat feature's columns are its DNN input's width over its table's ``dims``)."""
        by_output = {f.output: f for f in self.features}
        inputs: list[TensorSpec] = []
        for spec in dnn.inputs:
            feature = by_output.get(spec.name)
            if feature is None:
                inputs.append(spec)
                continue
            concat = feature.combiner == "concat" and spec.shape[1] != -1
            inputs += feature.id_inputs(spec.shape[1] // dims[feature.table] if concat else -1)
        return Signature.build(inputs, list(dnn.outputs))


class SplitRuntime(ModelRuntime):
    """A split model in this process: the DNN's runtime and the embedding lookup of the
    version it was trained with."""

    def __init__(
        self,
        dnn: ModelRuntime,
        manifest: SplitManifest,
        lookup: EmbeddingLookup,
        model: str,
        tier: EmbeddingTier | None = None,
    ) -> None:
        super().__init__(manifest.signature(dnn.signature, lookup.dims), dnn.device)
        self.platform = dnn.platform  # type: ignore[misc]  # the DNN's, per instance
        self.dnn = dnn
        self.manifest = manifest
        self.lookup = lookup  # replaced whole by ``refresh``; a request reads it once
        self.model = model
        self.cpu_ops = dnn.cpu_ops
        self._tier = tier
        self._tables: dict[str, int | None] = {f.table: None for f in manifest.features}
        self._refreshing = threading.Lock()

    @classmethod
    def load(cls, model_dir: Path, options: Any) -> ModelRuntime:
        raise ModelLoadError("a split model is loaded with SplitRuntime.open, not load")

    @classmethod
    def open(
        cls, dnn: ModelRuntime, manifest: SplitManifest, tier: EmbeddingTier, model: str
    ) -> SplitRuntime:
        """``dnn`` with the lookup of the manifest's embedding version, which must be complete
        in the store with every table the features name (checked now, not at a request)."""
        dims = {f.table: _row_width(f, dnn.signature) for f in manifest.features}
        version = manifest.embedding_version
        if manifest.follow_updates:
            version = tier.store().newest_descendant(version) or version
        lookup = tier.lookup(version, dims)
        try:
            for feature in manifest.features:
                _check_width(feature, dnn.signature, lookup.dims[feature.table])
        except ModelLoadError:
            lookup.close()
            raise
        return cls(dnn, manifest, lookup, model, tier)

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        dnn_inputs = {k: v for k, v in inputs.items() if self.dnn.signature.input(k) is not None}
        try:
            with self.lookup.using() as lookup:  # one embedding version for the whole request
                pooled, counts = self.manifest.embed(lookup, inputs)
        except EmbeddingStoreError:
            metrics.count_embedding_store_error(self.model)
            raise
        metrics.observe_embedding_lookup(self.model, time.perf_counter() - started, counts)
        return self.dnn.predict({**dnn_inputs, **pooled})

    def refresh(self) -> str | None:
        """Move to the newest delta published on top of the manifest's embedding version, if
        it is newer than the one served (``follow_updates``); the new lookup's node cache
        starts as the old one's less the changed rows, requests in flight finish on the old
        one. Returns the version moved to, None if none. Store errors propagate (the caller
        logs them and keeps serving)."""
        if not self.manifest.follow_updates or self._tier is None:
            return None
        with self._refreshing:
            current = self.lookup
            newest = self._tier.store().newest_descendant(self.manifest.embedding_version)
            if newest is None or newest == current.version:
                return None
            chain = [r.version for r in self._tier.store().chain(newest)]
            if current.version not in chain:  # not on top of what is served: not newer
                return None
            fresh = self._tier.lookup(newest, self._tables, previous=current)
            self.lookup = fresh
        current.retire()
        return newest

    def graph_status(self) -> dict[str, Any] | None:
        return self.dnn.graph_status()

    def close(self) -> None:
        self.lookup.retire()
        self.dnn.close()


def _row_width(feature: EmbeddingFeature, dnn: Signature) -> int | None:
    """The table's dim as the DNN's input implies it (None: only the store knows); a DNN
    with no such float32 input is a ModelLoadError."""
    spec = dnn.input(feature.output)
    if spec is None or spec.dtype != "float32" or len(spec.shape) != 2:
        raise ModelLoadError(
            f"feature {feature.input}: the DNN has no float32 [rows, width] input "
            f"{feature.output!r}; it takes {[s.name for s in dnn.inputs]}"
        )
    width = spec.shape[1]
    return width if feature.combiner != "concat" and width != -1 else None


def _check_width(feature: EmbeddingFeature, dnn: Signature, dim: int) -> None:
    """A concat feature's DNN input is columns x dim wide: the width must divide by dim."""
    spec = dnn.input(feature.output)
    width = spec.shape[1] if spec is not None else -1
    if width == -1:
        return
    if (feature.combiner == "concat" and width % dim) or (
        feature.combiner != "concat" and width != dim
    ):
        raise ModelLoadError(
            f"feature {feature.input}: table {feature.table} has dim {dim}, which does not fit "
            f"the DNN's input {feature.output!r} of width {width}"
        )


def _added(before: Counts | None, more: Counts) -> Counts:
    if before is None:
        return more
    return (before[0] + more[0], before[1] + more[1], before[2] + more[2])
