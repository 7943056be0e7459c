"""One image encode, timed per stage and per operation (`edge-bench --images`).

The stages (patch embedding, attention, MLP, deepstack, merger) come from the model
family's table of projector weight names (VisionFacts.encoder_stages in edge_models);
the times from ggml's scheduler, node by node (edge_llama.graph_watch). Preprocessing
(JPEG decode, resize, mtmd's normalisation) is timed around the tokenizer.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from edge_llama.graph_watch import NodeTime
from edge_models import family_for_gguf

OTHER = "other"
# The default family's stages; profile_encode uses those of the projector it profiles.
ENCODER_STAGES = family_for_gguf().vision.encoder_stages


@dataclass(frozen=True)
class OpRow:
    stage: str
    op: str  # "MUL_MAT q8_0", "FLASH_ATTN_EXT", "other ops"
    seconds: float
    flops: float
    nodes: int

    @property
    def gflop_s(self) -> float | None:
        return self.flops / self.seconds / 1e9 if self.flops and self.seconds > 0 else None


@dataclass
class EncoderProfile:
    tokens: int
    preprocess_s: float
    encode_s: float  # a warm encode as the runtime runs it (graph in one piece)
    profiled_s: float  # the same encode, node by node
    rows: list[OpRow] = field(default_factory=list)
    embeddings: np.ndarray | None = None


def node_stages(nodes: Sequence[NodeTime], stages: Sequence[tuple[str, str]] = ENCODER_STAGES) -> list[str]:
    """Each node's stage: by the weight it reads, else that of the next node reading one (else the last seen)."""
    patterns = [(re.compile(p), s) for p, s in stages]

    def by_weight(node: NodeTime) -> str | None:
        if node.weight is None:
            return None
        return next((s for p, s in patterns if p.search(node.weight)), OTHER)

    own = [by_weight(n) for n in nodes]
    out: list[str | None] = [None] * len(nodes)
    following = None
    for i in range(len(nodes) - 1, -1, -1):
        following = own[i] or following
        out[i] = following
    last = None  # nodes after the last weight-reading one (final concatenations) join the stage before them
    for i, s in enumerate(own):
        last = s or last
        out[i] = out[i] or last or OTHER
    return out  # type: ignore[return-value]


def op_label(node: NodeTime) -> str:
    if node.op == "MUL_MAT":
        return f"MUL_MAT {node.weight_type}" if node.weight_type else "MUL_MAT (activations)"
    return node.op if node.op == "FLASH_ATTN_EXT" else "other ops"


def op_rows(nodes: Sequence[NodeTime], stages: Sequence[tuple[str, str]] = ENCODER_STAGES) -> list[OpRow]:
    """Seconds and FLOPs per (stage, op kind), stages in graph order."""
    acc: dict[tuple[str, str], list[float]] = {}
    for node, stage in zip(nodes, node_stages(nodes, stages)):
        row = acc.setdefault((stage, op_label(node)), [0.0, 0.0, 0])
        row[0] += node.seconds
        row[1] += node.flops
        row[2] += 1
    order = {s: i for i, (_, s) in enumerate(stages)}
    keys = sorted(acc, key=lambda k: (order.get(k[0], len(order)), -acc[k][0]))
    return [OpRow(stage=s, op=o, seconds=acc[(s, o)][0], flops=acc[(s, o)][1], nodes=int(acc[(s, o)][2]))
            for s, o in keys]


def profile_encode(chat, image, detail: str | None = None, *, keep_embeddings: bool = False) -> EncoderProfile:
    """Preprocess, encode once warm as the runtime does, then once node by node.

    `chat` is a VisionChat without encoder caches (encoder_cache_mb=0, no
    encoder_cache_dir), so every encode runs the encoder; the first one, which
    allocates the projector's compute buffer, is not counted.
    """
    engine = chat.engine
    t0 = time.perf_counter()
    loaded = chat.load_image(image, detail)
    preprocess_s = time.perf_counter() - t0
    engine.encode_image(loaded)
    t0 = time.perf_counter()
    embd, _, _ = engine.encode_image(loaded)
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with engine.encoder_watch.timing() as nodes:
        engine.encode_image(loaded)
    profiled_s = time.perf_counter() - t0
    return EncoderProfile(tokens=int(embd.shape[0]), preprocess_s=preprocess_s, encode_s=encode_s,
                          profiled_s=profiled_s, rows=op_rows(nodes, engine.vision.facts.encoder_stages), embeddings=embd if keep_embeddings else None)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Per-token cosine of two embedding arrays: (mean, worst)."""
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    cos = num / np.maximum(den, 1e-12)
    return float(cos.mean()), float(cos.min())
