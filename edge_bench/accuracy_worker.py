"""Accuracy of one configuration: how far its quant and KV-cache type move the model from the float files.

The same probes as `edge-convert`'s quality report (quant.quality): text and
image+text prompts, teacher-forced on the float model's greedy continuation,
KL divergence of every next-token distribution, top-1 agreement and the
logits' relative RMS error (which still moves where random weights saturate
softmax and KL reads ~0); plus the
cosine of the projector's image embeddings against the float projector's.
The float pair runs with an f16 KV cache; the tested pair with the
configuration's KV type, so a quantized cache's error is part of the figure.
"""
from __future__ import annotations

from .workers import Recorder, WorkerSpec

FIGURES = ("kl_mean", "kl_p99", "kl_max", "top1_agreement", "logit_rel_rmse")


def measure(spec: WorkerSpec, rec: Recorder) -> None:
    from quant.quality import ModelPair, QualityOptions, evaluate

    ref = spec.variant or {}
    if not ref.get("text") or not ref.get("mmproj"):
        # a plain ValueError: a worker started without the files edge-bench always passes: a programming error
        raise ValueError("the accuracy worker needs the float reference pair (variant text/mmproj)")
    report = evaluate(ModelPair(ref["text"], ref["mmproj"]), ModelPair(spec.text_path, spec.mmproj_path),
                      QualityOptions(threads=spec.measure.threads, test_kv=spec.config.kv_type))
    if report.overall is not None:
        for name in FIGURES:
            if getattr(report.overall, name) is not None:
                rec.value(name, getattr(report.overall, name))
        rec.value("positions", report.overall.positions)
    if report.image_cosine_mean is not None:
        rec.value("image_cosine_mean", report.image_cosine_mean)
        rec.value("image_cosine_min", report.image_cosine_min)
    rec.note(f"accuracy: against {ref['text']} + {ref['mmproj']} (f16 KV)")
