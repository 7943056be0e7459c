"""Importance matrices: llama.cpp's file formats, checks against a model, and computing one.

An importance matrix holds, for every weight matrix, the sum of squared input
activations per input column (and how many rows were summed). Low-bit
quantizers weight their rounding error by it, so columns that carry large
activations keep more precision. llama.cpp's llama-imatrix only sees text; for
a vision-language model we run the transformers reference model over prompts
with images, so the projector and the text layers that read image tokens are
calibrated on what they will really see.

Formats (tools/imatrix/imatrix.cpp, common/imatrix-loader.cpp):
- GGUF: `general.type = "imatrix"`, `imatrix.datasets` (string array),
  `imatrix.chunk_count` / `imatrix.chunk_size` (u32); per weight `NAME.in_sum2`
  (F32, ne = [n_cols, n_mat]) and `NAME.counts` (F32, ne = [1, n_mat]).
- legacy .dat: int32 n_entries; per entry int32 len, name, int32 ncall,
  int32 nval, float[nval] = mean * ncall; then optional int32 chunk count,
  int32 len, dataset name.
torch and transformers are imported inside compute_imatrix only.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from convert.atomic import atomic_output

from .errors import QuantError

KV_DATASETS = "imatrix.datasets"
KV_CHUNK_COUNT = "imatrix.chunk_count"
KV_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
PROMPTS_FILE = "prompts.txt"
MIN_TEXT_COVERAGE = 0.5  # an imatrix covering less than this of the text weights is for another model


@dataclass
class ImatrixEntry:
    """Accumulated statistics of one weight: sums [n_mat, n_cols], counts [n_mat]."""

    sums: np.ndarray
    counts: np.ndarray

    @property
    def n_cols(self) -> int:
        return int(self.sums.shape[-1])

    def values(self, legacy: bool = False) -> np.ndarray:
        """Mean squared activation per column, flattened, as llama-quantize computes it."""
        sums = self.sums.reshape(len(self.counts), -1).astype(np.float32)
        out = np.empty_like(sums)
        for j, c in enumerate(self.counts):
            if c > 0:
                out[j] = sums[j] / np.float32(c)
            else:  # no data: GGUF readers use 1 (neutral), legacy ones the raw sums
                out[j] = sums[j] if legacy else 1.0
        return out.reshape(-1)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    path: Path | None = None  # where it was loaded from or saved to

    def values(self, name: str) -> np.ndarray | None:
        e = self.entries.get(name)
        return None if e is None else e.values(self.legacy)

    def subset(self, names: Iterable[str]) -> "Imatrix":
        keep = set(names)
        return Imatrix({k: v for k, v in self.entries.items() if k in keep}, self.datasets,
                       self.chunk_count, self.chunk_size, self.legacy, self.path)

    @property
    def label(self) -> str:
        return str(self.path) if self.path else (self.datasets[0] if self.datasets else "imatrix")


# --- file formats ---------------------------------------------------------------

def load(path: str | Path) -> Imatrix:
    """Read an imatrix file written by llama-imatrix (GGUF or legacy .dat) or by save()."""
    path = Path(path)
    if not path.is_file():
        raise QuantError(f"{path}: imatrix file not found; pass --imatrix auto to compute one, "
                         "or a file written by llama-imatrix.")
    with open(path, "rb") as f:
        magic = f.read(4)
    im = _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
    im.path = path
    return im


def _load_gguf(path: Path) -> Imatrix:
    import gguf

    r = gguf.GGUFReader(path)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise QuantError(f"{path}: imatrix tensor {t.name} is {t.tensor_type.name}, must be F32.")
        data = np.array(t.data, dtype=np.float32)
        if t.name.endswith(SUM_SUFFIX):
            sums[t.name[: -len(SUM_SUFFIX)]] = data.reshape(-1, int(t.shape[0]))
        elif t.name.endswith(COUNT_SUFFIX):
            counts[t.name[: -len(COUNT_SUFFIX)]] = data.reshape(-1)
    if not sums:
        raise QuantError(f"{path}: no '*.in_sum2' tensors; this is not an imatrix file.")
    unmatched = sorted(set(sums) ^ set(counts))
    if unmatched:
        raise QuantError(f"{path}: sums and counts do not pair up (first: {unmatched[0]!r}); the file is damaged.")
    entries = {n: ImatrixEntry(sums[n], np.rint(counts[n]).astype(np.int64)) for n in sorted(sums)}
    for n, e in entries.items():
        if e.sums.shape[0] != len(e.counts):
            raise QuantError(f"{path}: {n} has {e.sums.shape[0]} matrices but {len(e.counts)} counts.")

    def kv_value(key: str):
        f = r.get_field(key)
        return None if f is None else f.contents()

    datasets = kv_value(KV_DATASETS) or []
    return Imatrix(entries, tuple(datasets if isinstance(datasets, list) else [datasets]),
                   int(kv_value(KV_CHUNK_COUNT) or 0), int(kv_value(KV_CHUNK_SIZE) or 0))


def _load_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise QuantError(f"{path}: truncated imatrix file (neither GGUF nor a complete legacy .dat).")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise QuantError(f"{path}: not an imatrix file (bad entry count {n_entries}).")
    entries: dict[str, ImatrixEntry] = {}
    for _ in range(n_entries):
        (n,) = take("<i")
        name = data[pos: pos + n].decode("utf-8", "replace")
        pos += n
        ncall, nval = take("<ii")
        if nval < 1:
            raise QuantError(f"{path}: entry {name!r} has no values.")
        vals = np.array(take(f"<{nval}f"), dtype=np.float32)
        entries[name] = ImatrixEntry(vals.reshape(1, -1), np.array([ncall], dtype=np.int64))
    chunks, datasets = 0, ()
    if len(data) - pos >= 4:
        (chunks,) = take("<i")
        if len(data) - pos >= 4:
            (n,) = take("<i")
            if n > 0:
                datasets = (data[pos: pos + n].decode("utf-8", "replace"),)
    return Imatrix(entries, datasets, chunks, 0, legacy=True)


def save(im: Imatrix, path: str | Path) -> Path:
    """Write llama.cpp's GGUF imatrix format (temp file + rename)."""
    import gguf

    path = Path(path)
    with atomic_output(path) as tmp:
        w = gguf.GGUFWriter(tmp, "imatrix")
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes none
        try:
            w.add_string(gguf.Keys.General.TYPE, "imatrix")
            w.add_array(KV_DATASETS, list(im.datasets) or ["unknown"])
            w.add_uint32(KV_CHUNK_COUNT, int(im.chunk_count))
            w.add_uint32(KV_CHUNK_SIZE, int(im.chunk_size))
            for name in sorted(im.entries):
                e = im.entries[name]
                sums = np.ascontiguousarray(e.sums.reshape(len(e.counts), -1), dtype=np.float32)
                w.add_tensor(name + SUM_SUFFIX, sums)
                w.add_tensor(name + COUNT_SUFFIX, np.asarray(e.counts, dtype=np.float32).reshape(-1, 1))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    im.path = path
    return path


def save_legacy(im: Imatrix, path: str | Path) -> Path:
    """Write the legacy .dat format (for old tools); values = mean * ncall, as imatrix.cpp does."""
    path = Path(path)
    out = [struct.pack("<i", len(im.entries))]
    for name in sorted(im.entries):
        e = im.entries[name]
        ncall = max(1, int(max(e.counts)))
        vals = (e.values(im.legacy) * ncall).astype("<f4")
        raw = name.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, vals.size), vals.tobytes()]
    ds = (im.datasets[0] if im.datasets else "").encode()
    out += [struct.pack("<i", im.chunk_count), struct.pack("<i", len(ds)), ds]
    with atomic_output(path) as tmp:
        tmp.write_bytes(b"".join(out))
    return path


def resolve(imatrix: "Imatrix | str | Path | None") -> Imatrix | None:
    """An Imatrix from an object or a path (None stays None)."""
    if imatrix is None or isinstance(imatrix, Imatrix):
        return imatrix
    return load(imatrix)


# --- checking against a model ----------------------------------------------------

@dataclass(frozen=True)
class Coverage:
    """How much of one GGUF file's quantizable weights an imatrix covers."""

    role: str
    covered: tuple[str, ...]
    missing: tuple[str, ...]

    @property
    def fraction(self) -> float:
        total = len(self.covered) + len(self.missing)
        return len(self.covered) / total if total else 1.0


def matrix_columns(gguf_path: str | Path) -> dict[str, int]:
    """name -> row length (ne0) of each weight a quantizer may touch (2-D+, '*.weight', not a norm)."""
    import gguf

    r = gguf.GGUFReader(gguf_path)
    return {t.name: int(t.shape[0]) for t in r.tensors
            if len(t.shape) >= 2 and t.name.endswith("weight") and "_norm." not in t.name}


def check(im: Imatrix, models: Mapping[str, str | Path], *, min_text_coverage: float = MIN_TEXT_COVERAGE,
          text_role: str = "text") -> dict[str, Coverage]:
    """Refuse an imatrix made for another model; return its coverage of each file.

    Errors: it names tensors that no file has, its row lengths differ from the
    model's, or it covers less than `min_text_coverage` of the text weights.
    """
    cols = {role: matrix_columns(p) for role, p in models.items()}
    every: dict[str, int] = {}
    for c in cols.values():
        every.update(c)
    label = im.label
    unknown = sorted(n for n in im.entries if n not in every)
    if unknown:
        raise QuantError(
            f"{label}: the importance matrix names {len(unknown)} tensor(s) this model does not have "
            f"(first: {unknown[0]!r}); it was computed for another model. Use --imatrix auto to compute one for it."
        )
    for n, e in im.entries.items():
        if e.n_cols != every[n]:
            raise QuantError(f"{label}: {n} has {e.n_cols} columns in the importance matrix but {every[n]} in the model; "
                             "it was computed for another model. Use --imatrix auto.")
    result = {role: Coverage(role, tuple(sorted(n for n in c if n in im.entries)),
                             tuple(sorted(n for n in c if n not in im.entries))) for role, c in cols.items()}
    text = result.get(text_role)
    if text is not None and text.fraction < min_text_coverage:
        raise QuantError(
            f"{label}: the importance matrix covers only {len(text.covered)} of {len(text.covered) + len(text.missing)} "
            f"text-model weights (first missing: {text.missing[0]!r}); it was computed for another model. "
            "Use --imatrix auto."
        )
    return result


# --- computing one ------------------------------------------------------------------

@dataclass(frozen=True)
class CalibrationSample:
    prompt: str
    image: Any | None = None  # a PIL image, or None for a text-only prompt
    source: str = "builtin"


@dataclass(frozen=True)
class ImatrixOptions:
    max_samples: int | None = None  # cap on calibration samples (None: all)
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    progress: bool = True
    image_size: tuple[int, int] = (320, 240)  # built-in synthetic images (w, h)


BUILTIN_QUESTIONS = (
    "Describe this image in detail.",
    "What shapes and colors do you see?",
    "How many objects are in the picture, and where are they?",
    "Is there any text in this image? What does it say?",
    "What is in the top left corner?",
    "Compare the left half of the image with the right half.",
)
BUILTIN_TEXT = (
    "Write a short paragraph about why small language models are useful on edge devices.",
    "List three differences between a cat and a dog.",
    "Translate 'good morning, how are you?' into French and German.",
    "def fibonacci(n):\n    # return the n-th Fibonacci number\n",
    "What is 17 times 23? Explain the steps.",
)


def synthetic_images(size: tuple[int, int] = (320, 240)) -> list[Any]:
    """A few deterministic pictures with edges, gradients, shapes and noise."""
    from PIL import Image, ImageDraw

    w, h = size
    rng = np.random.default_rng(1234)
    yy, xx = np.mgrid[0:h, 0:w]
    grad = np.stack([xx / w * 255, yy / h * 255, np.full_like(xx, 128.0)], -1).astype(np.uint8)
    checker = ((((xx // 20) + (yy // 20)) % 2) * 200 + 30).astype(np.uint8)
    imgs = [Image.fromarray(grad), Image.fromarray(np.stack([checker, checker[::-1], 255 - checker], -1))]
    shapes = Image.new("RGB", size, (240, 240, 230))
    d = ImageDraw.Draw(shapes)
    d.ellipse([w * 0.1, h * 0.1, w * 0.45, h * 0.55], fill=(200, 30, 30))
    d.rectangle([w * 0.55, h * 0.2, w * 0.9, h * 0.8], fill=(30, 60, 200))
    d.polygon([(w * 0.2, h * 0.9), (w * 0.4, h * 0.6), (w * 0.6, h * 0.9)], fill=(30, 160, 60))
    d.text((w * 0.05, h * 0.02), "STOP 42", fill=(0, 0, 0))
    imgs.append(shapes)
    stripes = (np.sin(xx / 6.0 + yy / 11.0) * 100 + 128).astype(np.uint8)
    imgs.append(Image.fromarray(np.stack([stripes, 255 - stripes, stripes // 2], -1)))
    noise = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    imgs.append(Image.fromarray(noise).resize(size, Image.NEAREST))
    return imgs


def builtin_calibration(image_size: tuple[int, int] = (320, 240)) -> list[CalibrationSample]:
    imgs = synthetic_images(image_size)
    samples = [CalibrationSample(BUILTIN_QUESTIONS[i % len(BUILTIN_QUESTIONS)], img) for i, img in enumerate(imgs)]
    return samples + [CalibrationSample(t) for t in BUILTIN_TEXT]


def load_calibration(directory: str | Path) -> list[CalibrationSample]:
    """DIR/*.png|jpg|... paired round-robin with the lines of DIR/prompts.txt; every prompt also runs text-only."""
    from PIL import Image

    d = Path(directory)
    if not d.is_dir():
        raise QuantError(f"{d}: calibration directory not found; it should hold images and a {PROMPTS_FILE}.")
    prompts: list[str] = []
    pf = d / PROMPTS_FILE
    if pf.is_file():
        prompts = [ln.strip() for ln in pf.read_text(encoding="utf-8").splitlines() if ln.strip()]
    images = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images and not prompts:
        raise QuantError(f"{d}: no images ({', '.join(IMAGE_SUFFIXES)}) and no {PROMPTS_FILE}; nothing to calibrate on.")
    questions = prompts or ["Describe this image."]
    samples = []
    for i, p in enumerate(images):
        try:
            img = Image.open(p).convert("RGB")
        except OSError as e:
            raise QuantError(f"{p}: cannot read this image ({e}).") from e
        samples.append(CalibrationSample(questions[i % len(questions)], img, str(p)))
    samples += [CalibrationSample(q, None, str(pf)) for q in prompts]
    return samples


def gguf_name_resolver(config: dict[str, Any]) -> Callable[[str], str | None]:
    """HF parameter name -> GGUF tensor name, from the converter's architecture module."""
    from convert.arch import lookup as arch_lookup

    spec = arch_lookup(config)

    def resolve_name(hf_name: str) -> str | None:
        for out in spec.outputs:
            if out.claims(hf_name):
                try:
                    maps = out.map_tensor(hf_name, config)
                except Exception:  # noqa: BLE001 - a module the converter does not export
                    return None
                return maps[0].name if len(maps) == 1 and maps[0].transform is None else None
        return None

    return resolve_name


class _Accumulator:
    """Forward pre-hooks on every nn.Linear: sum of x**2 per input column, and row counts."""

    def __init__(self, model, resolve_name: Callable[[str], str | None]):
        import torch

        canonical = {id(p): n for n, p in model.named_parameters()}  # tied weights: the first name wins
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.handles = []
        for _, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            name = resolve_name(canonical.get(id(mod.weight), ""))
            if name is None:
                continue
            self.handles.append(mod.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str):
        import torch

        def hook(module, args):
            x = args[0].detach().to(torch.float64)
            x = x.reshape(-1, x.shape[-1])
            s = (x * x).sum(0)
            self.sums[name] = self.sums[name] + s if name in self.sums else s
            self.counts[name] = self.counts.get(name, 0) + int(x.shape[0])

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def entries(self) -> dict[str, ImatrixEntry]:
        return {n: ImatrixEntry(self.sums[n].numpy().astype(np.float32).reshape(1, -1),
                                np.array([self.counts[n]], dtype=np.int64)) for n in sorted(self.sums)}


def _sample_inputs(sample: CalibrationSample, tokenizer, image_processor, config: dict[str, Any]):
    """input_ids (+ pixels) the way Qwen-style processors build them: one pad token per merged patch."""
    import torch

    content: list[dict[str, Any]] = [{"type": "text", "text": sample.prompt}]
    if sample.image is not None:
        content.insert(0, {"type": "image"})
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    kwargs: dict[str, Any] = {}
    if sample.image is not None:
        pix = image_processor(images=[sample.image], return_tensors="pt")
        merge = int(getattr(image_processor, "merge_size", 2))
        n = int(pix["image_grid_thw"].prod()) // (merge * merge)
        pad = tokenizer.convert_ids_to_tokens(int(config["image_token_id"]))
        if pad not in text:
            raise QuantError("the chat template did not insert an image placeholder; cannot calibrate on images.")
        text = text.replace(pad, pad * n, 1)
        kwargs = {"pixel_values": pix["pixel_values"], "image_grid_thw": pix["image_grid_thw"]}
    ids = tokenizer(text, return_tensors="pt")
    kwargs["input_ids"] = ids["input_ids"]
    kwargs["attention_mask"] = ids["attention_mask"]
    if sample.image is not None:
        kwargs["mm_token_type_ids"] = (ids["input_ids"] == int(config["image_token_id"])).to(torch.long)
    return kwargs


def compute_imatrix(model_dir: str | Path, calibration: str | Path | Sequence[CalibrationSample] | None = None,
                    options: ImatrixOptions = ImatrixOptions()) -> Imatrix:
    """Run the transformers reference model (CPU, float32) over calibration prompts with images.

    `calibration`: None (built-in synthetic images + questions + text prompts),
    a directory (see load_calibration) or a list of samples.
    """
    import inspect
    import json

    try:
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer
    except ImportError as e:
        raise QuantError(f"--imatrix auto needs torch and transformers ({e}); install the 'convert' extra: "
                         "pip install -e '.[convert]'.") from e
    from tqdm import tqdm

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if calibration is None:
        samples = builtin_calibration(options.image_size)
        dataset = "builtin:synthetic-images+questions"
    elif isinstance(calibration, (str, Path)):
        samples = load_calibration(calibration)
        dataset = str(Path(calibration).resolve())
    else:
        samples, dataset = list(calibration), "samples"
    if options.max_samples:
        samples = samples[: options.max_samples]
    if options.threads:
        torch.set_num_threads(options.threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = _image_processor(model_dir)
    AutoConfig.from_pretrained(model_dir)  # fail early with transformers' message on a bad config
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    accepts = set(inspect.signature(model.forward).parameters)
    acc = _Accumulator(model, gguf_name_resolver(config))
    n_tokens = 0
    try:
        with torch.inference_mode():
            for s in tqdm(samples, desc="imatrix", disable=not options.progress, leave=False):
                kwargs = _sample_inputs(s, tokenizer, image_processor, config)
                kwargs = {k: v for k, v in kwargs.items() if k in accepts}
                n_tokens += int(kwargs["input_ids"].shape[-1])
                model(**kwargs)  # logits for every token: the output layer is calibrated like the others
    finally:
        acc.remove()
    entries = acc.entries()
    if not entries:
        raise QuantError(f"{model_dir}: no linear layer mapped to a GGUF tensor; is this a supported architecture?")
    return Imatrix(entries, (dataset,), chunk_count=len(samples),
                   chunk_size=max(1, math.ceil(n_tokens / max(1, len(samples)))))


def _image_processor(model_dir: Path):
    """The checkpoint's image processor; without torchvision transformers picks its PIL backend."""
    import logging

    from transformers import AutoImageProcessor

    log = logging.getLogger("transformers")
    level = log.level
    log.setLevel(logging.ERROR)  # the torchvision -> PIL fallback warning is expected here
    try:
        return AutoImageProcessor.from_pretrained(model_dir, use_fast=False)
    finally:
        log.setLevel(level)
