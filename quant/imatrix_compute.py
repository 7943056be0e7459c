"""Compute an importance matrix by running the transformers reference model over calibration samples.

Forward pre-hooks on every nn.Linear sum x**2 per input column; names map to
GGUF through the model package's ArchSpec, and the family's calibration module
builds the model inputs (its placeholder expansion). torch and transformers
are imported inside compute_imatrix only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edge_models import family_for_hf, lookup

from .calibration import CalibrationSample, builtin_calibration, load_calibration
from .errors import QuantError
from .imatrix import Imatrix, ImatrixEntry


@dataclass(frozen=True)
class ImatrixOptions:
    max_samples: int | None = None  # cap on calibration samples (None: all)
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    progress: bool = True
    image_size: tuple[int, int] = (320, 240)  # built-in synthetic images (w, h)


def gguf_name_resolver(config: dict[str, Any]) -> Callable[[str], str | None]:
    """HF parameter name -> GGUF tensor name, from the converter's architecture module."""
    spec = lookup(config)

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
    family = family_for_hf(config).module("calibration")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = family.image_processor(model_dir)
    AutoConfig.from_pretrained(model_dir)  # fail early with transformers' message on a bad config
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    accepts = set(inspect.signature(model.forward).parameters)
    acc = _Accumulator(model, gguf_name_resolver(config))
    n_tokens = 0
    try:
        with torch.inference_mode():
            for s in tqdm(samples, desc="imatrix", disable=not options.progress, leave=False):
                kwargs = family.model_inputs(s.prompt, s.image, tokenizer, image_processor, config)
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
