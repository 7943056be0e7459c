"""Compute an importance matrix by running the transformers reference model over calibration samples.

Forward pre-hooks on every nn.Linear sum x**2 per input column; names map to
GGUF through the model package's ArchSpec, and the family's calibration module
builds the model inputs (its placeholder expansion). Mixture-of-experts layers
in transformers 5's fused form (an experts module holding 3-D `gate_up_proj` /
`down_proj` and called with the routing, plus a router with a bare 2-D weight)
are accumulated per expert, as llama-imatrix does for MUL_MAT_ID: one row of
sums and one count per expert, the count being the tokens routed to it.
torch and transformers are imported inside compute_imatrix only.
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


def gguf_names(config: dict[str, Any]) -> Callable[[str, tuple[int, ...] | None], list[str]]:
    """HF parameter name (+ its shape in memory) -> the GGUF tensors it becomes, from the architecture module."""
    spec = lookup(config)

    def names(hf_name: str, shape: tuple[int, ...] | None = None) -> list[str]:
        for out in spec.outputs:
            if out.claims(hf_name):
                try:
                    return [m.name for m in out.map_tensor(hf_name, config, shape)]
                except Exception:  # noqa: BLE001 - a module the converter does not export
                    return []
        return []

    return names


def gguf_name_resolver(config: dict[str, Any]) -> Callable[[str], str | None]:
    """HF parameter name -> GGUF tensor name when the weight is stored as it is (one map, no transform)."""
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


def _is_fused_experts(mod) -> bool:
    """transformers 5's fused experts: 3-D gate_up_proj [experts, 2*ff, hidden] and down_proj [experts, hidden, ff]."""
    gu, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    return (getattr(gu, "ndim", 0) == 3 and getattr(down, "ndim", 0) == 3 and hasattr(mod, "act_fn")
            and gu.shape[1] == 2 * down.shape[2])


class _Accumulator:
    """Forward pre-hooks: sum of x**2 per input column and row counts, per weight matrix (per expert for MoE)."""

    def __init__(self, model, config: dict[str, Any]):
        import torch

        canonical = {id(p): n for n, p in model.named_parameters()}  # tied weights: the first name wins
        resolve_name, names = gguf_name_resolver(config), gguf_names(config)
        self.sums: dict[str, Any] = {}  # name -> [n_mat, n_cols] float64
        self.counts: dict[str, np.ndarray] = {}  # name -> [n_mat]
        self.handles = []
        for prefix, mod in model.named_modules():
            if _is_fused_experts(mod):
                gate_up = names(f"{prefix}.gate_up_proj", tuple(mod.gate_up_proj.shape))
                down = names(f"{prefix}.down_proj", tuple(mod.down_proj.shape))
                if gate_up and down:
                    self.handles.append(mod.register_forward_pre_hook(self._experts_hook(gate_up, down[0]),
                                                                      with_kwargs=True))
                continue
            weight = getattr(mod, "weight", None)
            if isinstance(mod, torch.nn.Linear) or (  # or a router: a bare 2-D weight applied to its input
                    not isinstance(mod, torch.nn.Embedding) and isinstance(weight, torch.nn.Parameter)
                    and weight.ndim == 2 and not list(mod.children()) and "router" in type(mod).__name__.lower()):
                name = resolve_name(canonical.get(id(mod.weight), ""))
                if name is not None:
                    self.handles.append(mod.register_forward_pre_hook(self._hook(name)))

    def _add(self, name: str, x, n_mat: int = 1, mat: int = 0) -> None:
        import torch

        if name not in self.sums:
            self.sums[name] = torch.zeros(n_mat, x.shape[-1], dtype=torch.float64)
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)
        self.sums[name][mat] += (x * x).sum(0)
        self.counts[name][mat] += int(x.shape[0])

    def _hook(self, name: str):
        import torch

        def hook(module, args):
            x = args[0].detach().to(torch.float64)
            self._add(name, x.reshape(-1, x.shape[-1]))

        return hook

    def _experts_hook(self, gate_up_names: list[str], down_name: str):
        """Per expert: its tokens' inputs (gate and up share them) and act(gate) * up, down's input."""
        import torch

        def hook(module, args, kwargs):
            params = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
            hidden, top_k_index = params[0].detach(), params[1]
            n_expert = module.gate_up_proj.shape[0]
            x_all = hidden.reshape(-1, hidden.shape[-1]).to(torch.float64)
            for e in range(n_expert):
                rows = (top_k_index == e).any(dim=-1).nonzero().flatten()
                if rows.numel() == 0:
                    continue
                x = x_all[rows]
                for name in gate_up_names:
                    self._add(name, x, n_expert, e)
                gate, up = torch.nn.functional.linear(x, module.gate_up_proj[e].detach().to(torch.float64)).chunk(2, -1)
                self._add(down_name, module.act_fn(gate) * up, n_expert, e)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def entries(self) -> dict[str, ImatrixEntry]:
        return {n: ImatrixEntry(self.sums[n].numpy().astype(np.float32), self.counts[n].copy())
                for n in sorted(self.sums)}


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
    acc = _Accumulator(model, config)
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
