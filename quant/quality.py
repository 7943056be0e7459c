"""How much a quantized pair differs from its reference, in numbers users can compare.

Both text models run the same probe sequences through llama.cpp (the runtime's
engine), with and without images (through mtmd, the runtime's vision path):
the reference evaluates each prompt and greedily continues it; the quantized
model is teacher-forced on exactly the same tokens. At every position we
compare the two next-token distributions: KL(ref || test), and whether the
top-1 tokens agree. Projectors are compared on image embeddings: cosine
similarity between the reference's and the quantized projector's output for
the same image. Nothing here knows the architecture: prompts are raw text with
mtmd's media marker, and mtmd adds whatever image framing the model needs.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import QuantError

PROBE_PROMPTS = (
    "The quick brown fox jumps over the lazy dog. Then it",
    "Question: What is the capital of France?\nAnswer:",
    "def add(a, b):\n    return",
    "A small robot on a table looks at a red ball and",
    "List three colors: red, green,",
    "In 1969, the first humans landed on the",
)
IMAGE_PROMPTS = (
    "Describe this image.",
    "What colors and shapes are in this picture?",
    "Is there any text in the image?",
)


@dataclass(frozen=True)
class ModelPair:
    """A text GGUF and (optionally) its projector."""

    text: Path
    mmproj: Path | None = None

    @classmethod
    def from_dir(cls, out_dir: str | Path) -> "ModelPair":
        """The pair recorded in OUT/manifest.json by the converter."""
        from edge_common.errors import ModelFileError
        from edge_common.manifest import manifest_paths

        try:
            return cls(*manifest_paths(out_dir))
        except ModelFileError as e:
            raise QuantError(f"{e}; point at a folder written by edge-convert, or pass a ModelPair.") from None


def as_pair(x: "ModelPair | str | Path | tuple") -> ModelPair:
    if isinstance(x, ModelPair):
        return x
    if isinstance(x, tuple):
        return ModelPair(Path(x[0]), Path(x[1]) if len(x) > 1 and x[1] else None)
    return ModelPair.from_dir(x)


@dataclass(frozen=True)
class QualityOptions:
    n_ctx: int = 2048
    threads: int | None = None  # None: every core
    continuation: int = 24  # greedy tokens the reference adds after each prompt
    prompts: tuple[str, ...] = PROBE_PROMPTS
    image_prompts: tuple[str, ...] = IMAGE_PROMPTS
    images: tuple[Any, ...] | None = None  # PIL images or paths; None: built-in synthetic ones
    image_size: tuple[int, int] = (288, 224)
    test_kv: str = "f16"  # KV-cache type of the tested model (the reference keeps f16)
    text: bool = True  # run the text probes (KL / top-1)
    embeddings: bool = True  # compare projector embeddings


@dataclass(frozen=True)
class DivergenceStats:
    positions: int
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    # RMS of the logit error over the RMS of the reference logits, mean over positions: still
    # informative where softmax saturates and KL reads ~0 (random-weight checkpoints).
    logit_rel_rmse: float | None = None

    @classmethod
    def of(cls, kl: np.ndarray, agree: np.ndarray, rel: np.ndarray | None = None) -> "DivergenceStats | None":
        if kl.size == 0:
            return None
        return cls(int(kl.size), float(kl.mean()), float(np.percentile(kl, 99)), float(kl.max()), float(agree.mean()),
                   float(rel.mean()) if rel is not None and rel.size else None)


@dataclass(frozen=True)
class QualityReport:
    ref: str
    test: str
    overall: DivergenceStats | None
    text_only: DivergenceStats | None
    with_images: DivergenceStats | None
    image_cosine_mean: float | None = None
    image_cosine_min: float | None = None
    image_token_cosine_min: float | None = None
    images: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for manifest.json's "quality" section."""
        d = asdict(self)
        if not d["extra"]:
            del d["extra"]
        return d


# --- llama.cpp plumbing -------------------------------------------------------------

class _TextModel:
    def __init__(self, path: Path, n_ctx: int, threads: int, kv: str = "f16"):
        from edge_llama import FLASH_ATTN_AUTO, FLASH_ATTN_ON, Batch, Context, ContextOptions, LlamaLoadError, Model, kv_type

        cache = kv_type(kv)
        try:
            self._model = Model(path)
            flash = FLASH_ATTN_ON if cache.needs_flash_attn_for_v else FLASH_ATTN_AUTO
            self.ctx = Context(self._model, ContextOptions(
                n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(512, n_ctx), n_threads=threads,
                type_k=int(cache.ggml_type), type_v=int(cache.ggml_type), flash_attn=flash))
        except LlamaLoadError as exc:
            if getattr(self, "_model", None) is not None:
                self._model.close()
            raise QuantError(f"{path}: {exc}") from exc
        self.n_batch = n_ctx
        self.n_vocab = self._model.n_vocab
        self._batch = Batch(n_ctx)

    def reset(self) -> None:
        self.ctx.clear()

    def tokenize(self, text: str) -> list[int]:
        return self._model.tokenize(text, add_special=True)

    def is_eog(self, token: int) -> bool:
        return self._model.is_eog(token)

    def decode_tokens(self, tokens: Sequence[int], n_past: int) -> np.ndarray:
        """Decode with logits at every position; returns [len(tokens), n_vocab] float32."""
        from edge_llama import LlamaError

        out = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        for s in range(0, len(tokens), self.n_batch):
            part = [int(t) for t in tokens[s: s + self.n_batch]]
            self._batch.fill(part, n_past + s, logits="all")
            try:
                self.ctx.decode_batch(self._batch)
            except LlamaError as exc:
                raise QuantError(f"evaluating probe prompts failed: {exc}") from exc
            out[s:s + len(part)] = self.ctx.all_logits(len(part))
        return out

    def close(self) -> None:
        self._batch.close()
        self.ctx.close()
        self._model.close()


class _Vision:
    def __init__(self, mmproj: Path, text: _TextModel, threads: int):
        check_projector(mmproj)
        from edge_llama import LlamaLoadError, Projector, ProjectorOptions

        try:
            self._proj = Projector(mmproj, text._model, ProjectorOptions(n_threads=threads, use_gpu=False))
        except LlamaLoadError as exc:
            raise QuantError(f"{mmproj}: mtmd cannot load this projector with {text._model.path.name}: {exc}") from exc
        self.text = text
        self.marker = self._proj.marker

    def tokenize(self, prompt: str, images: Sequence[Any]):
        from edge_llama import LlamaError

        try:
            return self._proj.tokenize(prompt, [_rgb(img) for img in images])
        except LlamaError as exc:
            raise QuantError(f"{exc} for probe {prompt!r}.") from exc

    def image_embedding(self, image: Any) -> np.ndarray:
        """The projector's output for one image: [n_tokens, n_embd_inp]."""
        from edge_llama import chunk_is_text

        with self.tokenize(self.marker, [image]) as chunks:
            for ch in chunks:
                if not chunk_is_text(ch):
                    return self._proj.encode(ch)
        raise QuantError("the probe produced no image chunk; does the projector support vision?")

    def eval_chunk(self, chunk: Any, n_past: int) -> int:
        return self._proj.eval_chunk(self.text.ctx, chunk, n_past, 0, n_batch=self.text.n_batch)

    def close(self) -> None:
        self._proj.close()


def check_projector(path: Path) -> None:
    """Refuse what would abort the process inside clip (edge_common.preflight says what)."""
    from edge_common.preflight import projector_problems

    problems = projector_problems(path)
    if problems:
        raise QuantError(f"{path}: {problems[0]} (or rewrite it with quant.mmproj.quantize_mmproj).")


def _rgb(image: Any) -> np.ndarray:
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.open(image)
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def _run(model: _TextModel, vision: "_Vision | None", prompt: str, images: Sequence[Any],
         forced: Sequence[int] | None, n_new: int) -> tuple[np.ndarray, list[int]]:
    """Logits at every text position of prompt (+ continuation); returns (logits, continuation tokens)."""
    from edge_llama import chunk_info

    model.reset()
    chunks = vision.tokenize(prompt, images) if vision is not None else None
    logits: list[np.ndarray] = []
    n_past = 0
    try:
        if chunks is None:
            toks = model.tokenize(prompt)
            logits.append(model.decode_tokens(toks, n_past))
            n_past += len(toks)
        else:
            for ch in chunks:
                info = chunk_info(ch)
                if info.kind == "text":
                    logits.append(model.decode_tokens(list(info.tokens), n_past))
                    n_past += len(info.tokens)
                else:
                    try:
                        n_past = vision.eval_chunk(ch, n_past)
                    # catching Exception: mtmd raises plain exceptions: named as a QuantError that says which probe failed
                    except Exception as exc:
                        raise QuantError(f"mtmd could not evaluate a probe image: {exc}") from exc
    finally:
        if chunks is not None:
            chunks.close()
    out = np.concatenate(logits) if logits else np.empty((0, model.n_vocab), np.float32)
    cont: list[int] = []
    last = out[-1] if len(out) else None
    for k in range(n_new if forced is None else len(forced)):
        tok = int(np.argmax(last)) if forced is None else int(forced[k])
        if forced is None and model.is_eog(tok):
            break
        cont.append(tok)
        last = model.decode_tokens([tok], n_past)[0]
        n_past += 1
        out = np.concatenate([out, last[None]])
    return out, cont


def kl_divergence(ref_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P_test) per row, from logits (float64 log-softmax)."""
    a = ref_logits.astype(np.float64)
    b = test_logits.astype(np.float64)
    la = a - a.max(1, keepdims=True)
    la -= np.log(np.exp(la).sum(1, keepdims=True))
    lb = b - b.max(1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(1, keepdims=True))
    return np.maximum(0.0, (np.exp(la) * (la - lb)).sum(1))


def logit_rel_rmse(ref_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """Per position: RMS(test - ref) / RMS(ref) of the raw logits."""
    ref = ref_logits.astype(np.float64)
    err = np.sqrt(np.mean((test_logits.astype(np.float64) - ref) ** 2, axis=-1))
    return err / np.maximum(np.sqrt(np.mean(ref ** 2, axis=-1)), 1e-30)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def probe_images(options: QualityOptions) -> list[Any]:
    if options.images is not None:
        return list(options.images)
    from .calibration import synthetic_images

    return synthetic_images(options.image_size)[:3]


def image_cosines(ref: ModelPair, test: ModelPair, images: Iterable[Any], *, threads: int | None = None,
                  n_ctx: int = 512) -> list[tuple[float, float]]:
    """(whole-image cosine, worst per-token cosine) of the two projectors' embeddings, per image."""
    from edge_llama import capture

    if ref.mmproj is None or test.mmproj is None:
        raise QuantError("both pairs need a projector to compare image embeddings.")
    threads = threads or os.cpu_count() or 1

    out = []
    with capture():
        text = _TextModel(ref.text, n_ctx, threads)
        try:
            va, vb = _Vision(ref.mmproj, text, threads), None
            try:
                vb = _Vision(test.mmproj, text, threads)
                for img in images:
                    ea, eb = va.image_embedding(img), vb.image_embedding(img)
                    per_token = [cosine(x, y) for x, y in zip(ea, eb)]
                    out.append((cosine(ea, eb), min(per_token)))
            finally:
                va.close()
                if vb is not None:
                    vb.close()
        finally:
            text.close()
    return out


def evaluate(ref: "ModelPair | str | Path | tuple", test: "ModelPair | str | Path | tuple",
             options: QualityOptions = QualityOptions()) -> QualityReport:
    """Compare `test` against `ref` (each a converted output dir, a ModelPair or a (text, mmproj) tuple)."""
    ref, test = as_pair(ref), as_pair(test)
    threads = options.threads or os.cpu_count() or 1
    images = probe_images(options)
    use_images = ref.mmproj is not None and test.mmproj is not None
    groups: dict[str, tuple[list[np.ndarray], ...]] = {"text": ([], [], []), "image": ([], [], [])}
    if options.text:
        probes = [(p, []) for p in options.prompts]
        if use_images:
            from edge_llama import default_marker

            marker = default_marker()
            probes += [(f"{marker}\n{q}", [img]) for q, img in zip(_cycle(options.image_prompts, len(images)), images)]
        ref_runs = _run_all(ref, probes, None, options, threads, use_images)
        test_runs = _run_all(test, probes, [c for _, c in ref_runs], options, threads, use_images,
                             kv=options.test_kv)
        for (p, imgs), (la, _), (lb, _) in zip(probes, ref_runs, test_runs):
            n = min(len(la), len(lb))
            kl = kl_divergence(la[:n], lb[:n])
            agree = la[:n].argmax(1) == lb[:n].argmax(1)
            g = groups["image" if imgs else "text"]
            g[0].append(kl)
            g[1].append(agree)
            g[2].append(logit_rel_rmse(la[:n], lb[:n]))
    stats = {k: DivergenceStats.of(*(_joined(part) for part in v)) for k, v in groups.items()}
    overall = DivergenceStats.of(*(_joined([x for v in groups.values() for x in v[i]]) for i in range(3)))
    cos: list[tuple[float, float]] = []
    if options.embeddings and use_images:
        cos = image_cosines(ref, test, images, threads=threads)
    return QualityReport(
        ref=str(ref.text),
        test=str(test.text),
        overall=overall, text_only=stats["text"], with_images=stats["image"],
        image_cosine_mean=float(np.mean([c for c, _ in cos])) if cos else None,
        image_cosine_min=float(min(c for c, _ in cos)) if cos else None,
        image_token_cosine_min=float(min(t for _, t in cos)) if cos else None,
        images=len(cos),
    )


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0)


def _cycle(items: Sequence[str], n: int) -> list[str]:
    return [items[i % len(items)] for i in range(n)] if items else ["Describe this image."] * n


def _run_all(pair: ModelPair, probes, forced, options: QualityOptions, threads: int, use_images: bool,
             kv: str = "f16"):
    from edge_llama import capture

    runs = []
    with capture():
        model = _TextModel(pair.text, options.n_ctx, threads, kv)
        vision = None
        try:
            if use_images:
                vision = _Vision(pair.mmproj, model, threads)
            for k, (prompt, imgs) in enumerate(probes):
                runs.append(_run(model, vision, prompt, imgs, None if forced is None else forced[k],
                                 options.continuation))
        finally:
            if vision is not None:
                vision.close()
            model.close()
    return runs


def format_table(report: QualityReport) -> str:
    """A plain-text table of the report, for the CLI."""
    rows = [("probe set", "positions", "KL mean", "KL p99", "KL max", "top-1 agree", "logit rel. RMSE")]
    for label, s in (("all", report.overall), ("text only", report.text_only), ("with images", report.with_images)):
        if s is not None:
            rows.append((label, str(s.positions), f"{s.kl_mean:.5f}", f"{s.kl_p99:.5f}", f"{s.kl_max:.5f}",
                         f"{100 * s.top1_agreement:.1f}%",
                         f"{s.logit_rel_rmse:.4f}" if s.logit_rel_rmse is not None else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"quality of {report.test} vs {report.ref}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if report.image_cosine_mean is not None:
        lines.append(f"image embeddings: cosine mean {report.image_cosine_mean:.5f}, min {report.image_cosine_min:.5f} "
                     f"(worst token {report.image_token_cosine_min:.5f}) over {report.images} image(s)")
    return "\n".join(lines)
