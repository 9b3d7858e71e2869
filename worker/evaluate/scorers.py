"""The four ways of scoring a token stream, each returning per-position NLL.

Every scorer fills an array with one float per token of a document. Entry ``t`` is the
negative log-likelihood (nats) of token ``t`` given the part of the earlier tokens that
the mode keeps in context. It is NaN where the mode did not score ``t``, always at ``t = 0``.

- dense: a plain transformers forward with an unbounded KV cache (chunked prefill, which
  yields the same numbers as token-by-token decoding with a full cache).
- recompute: for each scored position, a fresh forward over the previous
  ``cache_tokens`` tokens, so every context is encoded from scratch.
- window / streaming: the sinkstream engine with ``sink_tokens`` 0 / ``sink_tokens``,
  appending ``event_tokens`` at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from worker.evaluate.config import PplConfig
from worker.evaluate.documents import Document

Progress = Callable[[int], None]

ENGINE_CALL_TOKENS = 256  # tokens per stream per engine call, which sets the progress bar granularity


def sampled_positions(num_tokens: int, stride: int) -> np.ndarray:
    """Return the positions scored on the sample: every ``stride``-th one, from ``stride`` on."""
    return np.arange(stride, num_tokens, stride, dtype=np.int64) if stride > 1 else np.arange(1, num_tokens)


def empty_nll(num_tokens: int) -> np.ndarray:
    return np.full(num_tokens, np.nan, dtype=np.float32)


def _next_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """NLL of ``targets[i]`` under ``logits[i]``; logits [n, vocab], targets [n]."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return (-log_probs.gather(1, targets[:, None])[:, 0]).cpu().numpy()


@torch.inference_mode()
def score_dense(model: Any, document: Document, num_tokens: int, chunk_tokens: int, progress: Progress) -> np.ndarray:
    """Score the first ``num_tokens`` tokens of ``document`` with full attention."""
    device = model.device
    token_ids = torch.tensor(document.token_ids[:num_tokens], device=device)
    nll = empty_nll(len(document.token_ids))
    past_key_values = None
    for start in range(0, num_tokens, chunk_tokens):
        chunk = token_ids[start : start + chunk_tokens]
        output = model(input_ids=chunk[None], past_key_values=past_key_values, use_cache=True)
        past_key_values = output.past_key_values
        targets = token_ids[start + 1 : start + 1 + len(chunk)]  # the last chunk has one fewer
        nll[start + 1 : start + 1 + len(targets)] = _next_token_nll(output.logits[0, : len(targets)], targets)
        progress(len(chunk))
    return nll


@torch.inference_mode()
def score_recompute(
    model: Any, documents: list[Document], config: PplConfig, progress: Progress
) -> list[np.ndarray]:
    """Score the sampled positions of all documents, each from a freshly encoded window.

    The prediction of position ``t`` attends to tokens ``[max(0, t - cache_tokens), t)``.
    Up to ``t = cache_tokens`` that is the whole prefix, so those positions come from one
    dense forward over the first ``cache_tokens`` tokens, which gives the same numbers. Jobs from all documents
    are sorted by context length and batched, left-padded, ``recompute_batch`` at a time.
    """
    device = model.device
    nll = [empty_nll(len(document.token_ids)) for document in documents]
    jobs = []
    for doc_index, document in enumerate(documents):
        sample = sampled_positions(len(document.token_ids), config.sample_stride)
        prefix = sample[sample <= config.cache_tokens]
        if prefix.size:
            dense = score_dense(model, document, int(prefix[-1]) + 1, config.dense_chunk_tokens, lambda count: None)
            nll[doc_index][prefix] = dense[prefix]
            progress(int(prefix.size))
        jobs.extend((doc_index, int(position)) for position in sample[sample > config.cache_tokens])
    jobs.sort(key=lambda job: min(job[1], config.cache_tokens))
    for start in range(0, len(jobs), config.recompute_batch):
        batch = jobs[start : start + config.recompute_batch]
        contexts = [
            documents[doc_index].token_ids[max(0, position - config.cache_tokens) : position]
            for doc_index, position in batch
        ]
        width = max(len(context) for context in contexts)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        for row, context in enumerate(contexts):
            input_ids[row, width - len(context) :] = torch.tensor(context, device=device)
            attention_mask[row, width - len(context) :] = 1
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=1,
        )
        targets = torch.tensor(
            [documents[doc_index].token_ids[position] for doc_index, position in batch], device=device
        )
        values = _next_token_nll(output.logits[:, -1], targets)
        for (doc_index, position), value in zip(batch, values):
            nll[doc_index][position] = value
        progress(len(batch))
    return nll


@torch.inference_mode()
def score_engine(
    loaded: Any, documents: list[Document], config: PplConfig, sink_tokens: int, progress: Progress,
    on_call: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Score every position of all documents as concurrent streams of the sinkstream engine.

    Each stream's cache keeps ``sink_tokens`` sinks plus ``cache_tokens - sink_tokens`` recent
    tokens. Each call appends up to ``ENGINE_CALL_TOKENS`` tokens per stream, which the
    engine splits into events of ``event_tokens``.
    """
    from worker.engine import EngineConfig, StreamEngine

    engine = StreamEngine(
        loaded,
        EngineConfig(
            sink_tokens=sink_tokens,
            window_tokens=config.cache_tokens - sink_tokens,
            prefill_chunk_tokens=config.event_tokens,
            max_resident_streams=len(documents),
            max_batch_tokens=max(2048, config.event_tokens * len(documents)),
            dtype=str(loaded.dtype).removeprefix("torch."),
            device=str(loaded.device),
        ),
    )
    stream_ids = [f"ppl-{index}" for index in range(len(documents))]
    nll = [empty_nll(len(document.token_ids)) for document in documents]
    call_tokens = max(ENGINE_CALL_TOKENS, config.event_tokens)
    longest = max(len(document.token_ids) for document in documents)
    for start in range(0, longest, call_tokens):
        feed = {
            stream_id: document.token_ids[start : start + call_tokens]
            for stream_id, document in zip(stream_ids, documents)
            if start < len(document.token_ids)
        }
        scores = engine.score(feed)  # stream id -> [fed tokens] log-probability of each fed token
        for doc_index, stream_id in enumerate(stream_ids):
            if stream_id in feed:
                fed = len(feed[stream_id])
                nll[doc_index][start : start + fed] = (-scores[stream_id].float()).cpu().numpy()
        progress(sum(len(tokens) for tokens in feed.values()))
        if on_call is not None:
            on_call(min(start + call_tokens, longest))
    for stream_id in stream_ids:
        engine.drop_stream(stream_id)
    return nll


def mean_nll(values: np.ndarray) -> float:
    """Mean of the finite entries; NaN when there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan
