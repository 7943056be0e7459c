"""File sizes and runtime memory for every quantization type, before anything is converted.

The tensor list comes from the checkpoint's safetensors headers (or, given only
a config.json, from transformers' meta-device model) mapped to GGUF names and
shapes by the converter's architecture module. The text model's per-tensor
types are then chosen by a port of llama.cpp's llama_tensor_get_type
(src/llama-quant.cpp: the k-quant mixes, tied-embedding handling and block-size
fallbacks), the projector's by quant.mmproj's own rule, and file sizes follow
GGUF's layout (header, metadata, tensor table, 32-byte aligned data). The
llama.cpp port is checked tensor by tensor against llama_model_quantize in the
tests. Runtime memory = weights + KV cache (exact, as llama.cpp allocates it)
+ compute buffers (an estimate, see compute_bytes).
"""
from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as G

from . import catalog, kv
from .errors import QuantError
from .mmproj import plan_tensor

ALIGN = 32  # GGUF_DEFAULT_ALIGNMENT
FLOATS = (G.F32, G.F16, G.BF16)
# tensor_allows_quantization: name fragments llama.cpp never quantizes.
_NO_QUANT = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd",
    "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)
_NO_QUANT_EXACT = ("position_embd.weight", "token_types.weight")
_LAYER = re.compile(r"^blk\.(\d+)\.")
F = {t.name: t.ftype for t in catalog.TYPES}  # catalog name -> llama_ftype
_IQ2_LIKE = {F["iq2_xxs"], F["iq2_xs"], F["iq1_s"], F["iq2_s"], F["iq2_m"], F["iq1_m"]}


# --- the model's tensors -----------------------------------------------------------

@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: ne0 (row length) first
    ggml_type: G

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return int(np.prod(self.shape, dtype=np.int64)) // block * size


@dataclass(frozen=True)
class ModelShapes:
    """The converter's tensors per role ("text", "mmproj") and their metadata sizes."""

    tensors: Mapping[str, tuple[PlannedTensor, ...]]  # as in an f16 file
    metadata_bytes: Mapping[str, int]  # GGUF key/value section of each file (measured or estimated)
    source: str
    outputs: Mapping[str, Any] = field(default_factory=dict)  # role -> convert.spec.OutputFile

    def as_float(self, role: str, float_name: str) -> tuple[PlannedTensor, ...]:
        """The role's tensors as the converter writes them for --quant f32/f16/bf16."""
        from convert.pipeline import choose_type

        ftype = G[float_name.upper()]
        out = self.outputs[role]
        return tuple(PlannedTensor(t.name, t.shape, G(int(choose_type(t.name, tuple(reversed(t.shape)), ftype, out))))
                     for t in self.tensors[role])


def _hf_shapes(source: Path | dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[int, ...]], Path | None]:
    """(config, HF tensor name -> shape, checkpoint dir or None)."""
    if isinstance(source, dict):
        config, model_dir = source, None
    else:
        p = Path(source)
        model_dir = p if p.is_dir() else None
        cfg_path = p / "config.json" if p.is_dir() else p
        if not cfg_path.is_file():
            raise QuantError(f"{p}: no config.json; give a Hugging Face checkpoint folder or its config.json.")
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    if model_dir is not None and (any(model_dir.glob("*.safetensors"))):
        from convert.checkpoint import Checkpoint

        ckpt = Checkpoint.open(model_dir)
        return ckpt.config, {n: tuple(r.shape) for n, r in ckpt.tensors.items()}, model_dir
    try:
        from convert.synthetic import tensor_shapes
    except ImportError as e:  # pragma: no cover - depends on the install
        raise QuantError(f"estimating from config.json alone needs torch and transformers ({e}).") from e
    return config, tensor_shapes(config), model_dir


def load_shapes(source: str | Path | dict[str, Any], intermediate: str = "f16") -> ModelShapes:
    """GGUF tensors (names, shapes, intermediate types) the converter would write for `source`."""
    from convert.arch import lookup as arch_lookup
    from convert.pipeline import choose_type, transformed_shape

    config, hf, model_dir = _hf_shapes(source)
    spec = arch_lookup(config)
    ftype = G[intermediate.upper()]
    out: dict[str, list[PlannedTensor]] = {o.role: [] for o in spec.outputs}
    for name, shape in hf.items():
        for o in spec.outputs:
            if not o.claims(name):
                continue
            if o.skip(name, config):
                break
            for m in o.map_tensor(name, config):
                s = transformed_shape(tuple(shape), m.transform)
                out[o.role].append(PlannedTensor(m.name, tuple(reversed(s)), G(int(choose_type(m.name, s, ftype, o)))))
            break
    meta = measure_metadata(model_dir, spec) if model_dir is not None else None
    if meta is None:
        meta = guess_metadata(config, {r: len(ts) for r, ts in out.items()})
    return ModelShapes({r: tuple(sorted(ts, key=lambda t: _natural(t.name))) for r, ts in out.items()}, meta,
                       str(model_dir or "config"), {o.role: o for o in spec.outputs})


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def measure_metadata(model_dir: Path, spec) -> dict[str, int] | None:
    """Exact key/value bytes: run the architecture's metadata writer into a scratch file."""
    import gguf

    from convert.checkpoint import Checkpoint

    try:
        ckpt = Checkpoint.open(model_dir)
        sizes = {}
        with tempfile.TemporaryDirectory() as d:
            for o in spec.outputs:
                path = Path(d) / f"{o.role}.gguf"
                w = gguf.GGUFWriter(path, o.gguf_arch)
                o.write_metadata(w, ckpt)
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.close()
                sizes[o.role] = path.stat().st_size - 24  # minus magic, version, tensor and kv counts
        return sizes
    except Exception:  # noqa: BLE001 - e.g. no tokenizer files: fall back to a guess
        return None


def guess_metadata(config: dict[str, Any], n_tensors: Mapping[str, int]) -> dict[str, int]:
    """Without tokenizer files: ~30 bytes per vocabulary entry (token, type, merge) plus fixed keys."""
    tc = config.get("text_config") or config
    n_vocab = int(tc.get("vocab_size") or 0)
    return {role: 2048 + (30 * n_vocab if role == "text" else 0) for role in n_tensors}


# --- llama.cpp's type selection (src/llama-quant.cpp), dense models ---------------------

def allows_quantization(name: str, n_dims: int, quantize_output: bool = True) -> bool:
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if name == "output.weight" and not quantize_output:
        return False
    return name not in _NO_QUANT_EXACT and not any(k in name for k in _NO_QUANT)


def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "qkv"), ("attn_kv_b.weight", "kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _blck(t: G) -> int:
    return GGML_QUANT_SIZES[t][0]


_FALLBACK = {G.IQ1_S: G.IQ4_NL, G.IQ1_M: G.IQ4_NL, G.IQ2_XXS: G.IQ4_NL, G.IQ2_XS: G.IQ4_NL, G.IQ2_S: G.IQ4_NL,
             G.IQ3_XXS: G.IQ4_NL, G.IQ3_S: G.IQ4_NL, G.IQ4_XS: G.IQ4_NL, G.Q2_K: G.Q4_0, G.Q3_K: G.Q4_0,
             G.TQ1_0: G.Q4_0, G.TQ2_0: G.Q4_0, G.Q4_K: G.Q5_0, G.Q5_K: G.Q5_1, G.Q6_K: G.Q8_0}


def type_fallback(ne0: int, t: G) -> G:
    """tensor_type_fallback: a 32-block type when ne0 does not fit, F16 when nothing fits."""
    if ne0 % _blck(t) == 0:
        return t
    new = _FALLBACK.get(t, t)
    return new if ne0 % _blck(new) == 0 else G.F16


@dataclass
class _State:
    n_gqa: float
    n_layer: int
    n_attention_wv: int
    has_imatrix: bool
    tied: bool
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


def _impl(qs: _State, new: G, name: str, ne0: int, ftype: int, cat: str) -> G:
    """llama_tensor_get_type_impl for a dense, non-Falcon model."""
    attn_v_like = cat in ("attn_v", "qkv", "kv_b")
    if cat == "output" or (qs.tied and cat == "token_embd"):
        if ne0 % _blck(new) != 0:
            return G.Q8_0
        if ftype in (F["iq2_xxs"], F["iq2_xs"], F["iq3_xxs"], F["iq1_s"], F["iq2_s"], F["iq2_m"], F["iq1_m"]):
            return G.Q5_K
        return G.Q6_K if new != G.Q8_0 else new
    if cat == "token_embd":
        if ftype in (F["iq2_xxs"], F["iq2_xs"], F["iq1_s"], F["iq1_m"]):
            return G.Q2_K
        if ftype in (F["iq2_s"], F["iq2_m"], F["iq3_xxs"]):
            return G.IQ3_S
        if ftype in (F["tq1_0"], F["tq2_0"]):
            return G.Q4_K
        return new
    if ftype in _IQ2_LIKE:
        iq2s = ftype in (F["iq2_s"], F["iq2_m"])
        if attn_v_like:
            qs.i_attention_wv += 1
            return G.Q4_K if qs.n_gqa >= 4 else (G.IQ3_S if iq2s else G.Q2_K)
        if cat == "ffn_down":
            i = qs.i_ffn_down
            qs.i_ffn_down += 1
            return (G.IQ3_S if iq2s else G.Q2_K) if i < qs.n_layer // 8 else new
        if cat == "attn_output":
            if ftype in (F["iq1_s"], F["iq1_m"]):
                return G.IQ2_XXS
            if iq2s:
                return G.IQ3_S
        return new
    if attn_v_like:
        i, n = qs.i_attention_wv, qs.n_attention_wv
        qs.i_attention_wv += 1
        if ftype == F["q2_k"]:
            return G.Q4_K if qs.n_gqa >= 4 else G.Q3_K
        if ftype == F["q2_k_s"] and qs.n_gqa >= 4:
            return G.Q4_K
        if ftype == F["iq3_xxs"]:
            return G.Q4_K if qs.n_gqa >= 4 else (G.IQ3_S if not qs.has_imatrix else G.IQ3_XXS)
        if ftype in (F["iq3_xs"], F["iq3_s"]) and qs.n_gqa >= 4:
            return G.Q4_K
        if ftype == F["iq3_m"]:
            return G.Q4_K
        if ftype == F["q3_k_m"]:
            return G.Q5_K if i < 2 else G.Q4_K
        if ftype == F["q3_k_l"]:
            return G.Q5_K
        if ftype in (F["iq4_nl"], F["iq4_xs"]) and qs.n_gqa >= 4:
            return G.Q5_K
        if ftype in (F["q4_k_m"], F["q5_k_m"]) and _use_more_bits(i, n):
            return G.Q6_K
        if ftype == F["q4_k_s"] and i < 4:
            return G.Q5_K
        return new
    if cat in ("attn_k", "attn_q"):
        if ftype == F["iq3_xs"]:
            return G.IQ3_XXS
        if ftype == F["iq3_xxs"]:
            return G.IQ2_S
        return new
    if cat == "ffn_down":
        i, n = qs.i_ffn_down, qs.n_layer
        qs.i_ffn_down += 1
        if ftype == F["q2_k"]:
            return G.Q3_K
        if ftype == F["q2_k_s"]:
            return G.Q4_K if i < n // 8 else new
        if ftype == F["iq3_xxs"] and not qs.has_imatrix:
            return G.Q4_K if i < n // 8 else G.Q3_K
        if ftype == F["q3_k_m"]:
            return G.Q5_K if i < n // 16 else G.Q4_K
        if ftype == F["iq3_m"] and i < n // 8:
            return G.Q4_K
        if ftype == F["q3_k_l"]:
            return G.Q5_K
        if ftype == F["q4_k_m"]:
            return G.Q6_K if _use_more_bits(i, n) else new
        if i < n // 8 and ftype in (F["iq4_nl"], F["iq4_xs"]) and not qs.has_imatrix:
            return G.Q5_K
        if ftype == F["q5_k_m"] and _use_more_bits(i, n):
            return G.Q6_K
        if ftype == F["q4_k_s"] and i < n // 8:
            return G.Q5_K
        if ftype in (F["q4_0"], F["q5_0"]) and qs.has_imatrix and i < n // 8:
            return G.Q4_1 if ftype == F["q4_0"] else G.Q5_1
        return new
    if cat == "attn_output":
        return {F["q2_k"]: G.Q3_K, F["iq3_xxs"]: G.IQ3_S, F["q3_k_m"]: G.Q4_K, F["q3_k_l"]: G.Q5_K,
                F["iq3_m"]: G.Q4_K}.get(ftype, new)
    if cat == "qkv":  # unreachable (attn_v_like above), kept for parity with llama.cpp's chain
        return new
    if cat in ("ffn_gate", "ffn_up"):
        attr = "i_ffn_gate" if cat == "ffn_gate" else "i_ffn_up"
        i = getattr(qs, attr)
        setattr(qs, attr, i + 1)
        if ftype == F["iq3_xs"] and qs.n_layer // 8 <= i < 7 * qs.n_layer // 8:
            return G.IQ3_XXS
        return new
    return new


def _llama_order(name: str) -> tuple[int, str]:
    m = _LAYER.match(name)
    return (int(m[1]) if m else -1, name)


def text_types(tensors: Iterable[PlannedTensor], quant: str, *, imatrix: bool = False,
               pure: bool = False) -> list[PlannedTensor]:
    """The text model's tensors as llama_model_quantize would type them, in its file order."""
    t = catalog.lookup(quant)
    ts = sorted(tensors, key=lambda x: _llama_order(x.name))
    names = [x.name for x in ts]
    layers = {int(m[1]) for n in names if (m := _LAYER.match(n))}
    q_rows = next((x.shape[1] for x in ts if x.name.endswith("attn_q.weight")), 1)
    k_rows = next((x.shape[1] for x in ts if x.name.endswith("attn_k.weight")), 1)
    qs = _State(n_gqa=q_rows / k_rows, n_layer=len(layers),
                n_attention_wv=sum(category(n) in ("attn_v", "qkv", "kv_b") for n in names),
                has_imatrix=imatrix, tied="output.weight" not in names)
    out = []
    for x in ts:
        if not allows_quantization(x.name, len(x.shape)):
            out.append(x)
            continue
        new = t.ggml_type
        if new not in FLOATS:
            if not pure:
                new = _impl(qs, new, x.name, x.shape[0], t.ftype, category(x.name))
            new = type_fallback(x.shape[0], new)
        out.append(PlannedTensor(x.name, x.shape, new))
    return out


def mmproj_types(tensors: Iterable[PlannedTensor], quant: str) -> list[PlannedTensor]:
    qt = catalog.lookup_projector(quant)
    out = []
    for x in tensors:
        p = plan_tensor(x.name, x.shape, x.ggml_type, qt.ggml_type)
        out.append(PlannedTensor(x.name, x.shape, p.dst_type))
    return out


# --- GGUF layout ----------------------------------------------------------------------

def _pad(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def tensor_info_bytes(t: PlannedTensor) -> int:
    return 8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4 + 8


def gguf_file_bytes(metadata_bytes: int, tensors: Iterable[PlannedTensor]) -> int:
    """Header + key/values + tensor table, padded, + each tensor's data padded to 32 bytes."""
    ts = list(tensors)
    head = 24 + metadata_bytes + sum(tensor_info_bytes(t) for t in ts)
    return _pad(head) + sum(_pad(t.nbytes) for t in ts)


# llama-quantize adds general.quantization_version and general.file_type (u32 each).
_QUANT_KEYS = (8 + len("general.quantization_version") + 4 + 4) + (8 + len("general.file_type") + 4 + 4)


def _imatrix_keys(dataset: str = "builtin:synthetic-images+questions", path: str = "imatrix.gguf") -> int:
    def s(key: str, val: str) -> int:
        return 8 + len(key) + 4 + 8 + len(val)

    def u(key: str) -> int:
        return 8 + len(key) + 4 + 4

    return (s("quantize.imatrix.file", path) + s("quantize.imatrix.dataset", dataset)
            + u("quantize.imatrix.entries_count") + u("quantize.imatrix.chunks_count"))


# --- estimates -----------------------------------------------------------------------------

@dataclass(frozen=True)
class FileEstimate:
    role: str
    quant: str
    bytes: int
    tensor_bytes: int
    tensors: tuple[PlannedTensor, ...]

    def type_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(t.ggml_type.name for t in self.tensors).items()))

    def types(self) -> dict[str, str]:
        return {t.name: t.ggml_type.name for t in self.tensors}


@dataclass(frozen=True)
class Estimate:
    quant: str
    mmproj_quant: str
    n_ctx: int
    kv_type: str
    text: FileEstimate
    mmproj: FileEstimate | None
    kv_bytes: int
    compute_bytes: int  # text-model compute buffer (estimate)
    vision_compute_bytes: int  # projector compute buffer for one large image (estimate)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def disk_bytes(self) -> int:
        return self.text.bytes + (self.mmproj.bytes if self.mmproj else 0)

    @property
    def weights_bytes(self) -> int:
        return self.text.tensor_bytes + (self.mmproj.tensor_bytes if self.mmproj else 0)

    @property
    def total_runtime_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.vision_compute_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant": self.quant, "mmproj_quant": self.mmproj_quant, "n_ctx": self.n_ctx, "kv_type": self.kv_type,
            "text_bytes": self.text.bytes, "mmproj_bytes": self.mmproj.bytes if self.mmproj else 0,
            "kv_bytes": self.kv_bytes, "compute_bytes": self.compute_bytes,
            "vision_compute_bytes": self.vision_compute_bytes, "total_runtime_bytes": self.total_runtime_bytes,
            "text_tensor_types": self.text.type_counts(),
        }


@dataclass(frozen=True)
class TextDims:
    n_layer: int
    n_embd: int
    n_ff: int
    n_vocab: int
    k_row: int  # n_head_kv * head_dim
    v_row: int
    q_row: int  # n_head * head_dim

    @classmethod
    def of(cls, tensors: Iterable[PlannedTensor]) -> "TextDims":
        by = {t.name: t.shape for t in tensors}

        def first(suffix: str) -> tuple[int, ...]:
            for n, s in by.items():
                if n.endswith(suffix):
                    return s
            raise QuantError(f"the text model has no '*{suffix}' tensor; cannot size its KV cache.")

        layers = {int(m[1]) for n in by if (m := _LAYER.match(n))}
        emb = by.get("token_embd.weight") or first("token_embd.weight")
        return cls(len(layers), emb[0], first("ffn_up.weight")[1], emb[1], first("attn_k.weight")[1],
                   first("attn_v.weight")[1], first("attn_q.weight")[1])


def compute_bytes(d: TextDims, n_ctx: int, n_ubatch: int = 512) -> int:
    """Text compute + output buffers as llama.cpp reserves them on CPU (flash attention on, its default there).

    The worst-case graph of one ubatch is dominated by logits for every token
    and the gate/up activations: 4 * ubatch * (n_vocab + 2 * n_ff) bytes,
    which is llama.cpp's reported compute buffer for the Qwen3-VL-2B shapes to
    the byte (320.75 MiB at n_ubatch 512); n_embd per token is added as margin.
    """
    u = min(n_ubatch, kv.padded_ctx(n_ctx))
    return 4 * u * (d.n_vocab + 2 * d.n_ff + d.n_embd) + 4 * d.n_vocab


# mtmd reserves the projector's compute buffer at warmup with a 1472x1472 image
# for Qwen-VL-style projectors (92 x 92 patches of 16).
WARMUP_PATCHES = 92 * 92


def vision_compute_bytes(mmproj: Iterable[PlannedTensor], image_patches: int = WARMUP_PATCHES) -> int:
    """Projector compute buffer: 4 * patches * 2 * (n_embd + n_ff) bytes.

    Within 3% of mtmd's reported buffer for the Qwen3-VL-2B projector (322.5 MiB);
    an estimate for other shapes.
    """
    ups = [t.shape for t in mmproj if t.name.endswith("ffn_up.weight")]
    if not ups:
        return 0
    d, ff = ups[0][0], ups[0][1]
    return 4 * image_patches * 2 * (d + ff)


def estimate(model: "str | Path | dict[str, Any] | ModelShapes", quant: str = "q4_k_m", mmproj_quant: str | None = None,
             n_ctx: int = 4096, kv_type: str = "f16", *, imatrix: bool | None = None) -> Estimate:
    """Sizes of the files `edge-convert --quant QUANT --mmproj-quant M` writes, and the memory to run them."""
    shapes = model if isinstance(model, ModelShapes) else load_shapes(model)
    qt = catalog.lookup(quant)
    mq = catalog.lookup_projector(mmproj_quant or catalog.default_projector_type(quant))
    has_imatrix = qt.needs_imatrix if imatrix is None else imatrix
    text_meta = shapes.metadata_bytes["text"]
    if qt.is_float:  # the converter writes float files itself
        text_ts = tuple(sorted(shapes.as_float("text", qt.name), key=lambda x: _natural(x.name)))
    else:  # llama-quantize: its own tensor order, two more keys (four more with an imatrix)
        text_ts = tuple(text_types(shapes.tensors["text"], qt.name, imatrix=has_imatrix))
        text_meta += _QUANT_KEYS + (_imatrix_keys() if has_imatrix else 0)
    text = FileEstimate("text", qt.name, gguf_file_bytes(text_meta, text_ts), sum(t.nbytes for t in text_ts), text_ts)
    mm = None
    if "mmproj" in shapes.tensors:
        meta = shapes.metadata_bytes["mmproj"]
        if qt.is_float and mq.is_float:  # the converter alone writes both files
            mm_ts = shapes.as_float("mmproj", mq.name)
        else:
            mm_ts = tuple(mmproj_types(shapes.tensors["mmproj"], mq.name))
            meta += _QUANT_KEYS
        mm = FileEstimate("mmproj", mq.name, gguf_file_bytes(meta, mm_ts), sum(t.nbytes for t in mm_ts), mm_ts)
    d = TextDims.of(text_ts)
    kvb = kv.kv_bytes_for_rows(d.n_layer, d.k_row, d.v_row, n_ctx, kv_type)
    return Estimate(qt.name, mq.name, n_ctx, kv.kv_type(kv_type).name, text, mm, kvb, compute_bytes(d, n_ctx),
                    vision_compute_bytes(mm.tensors) if mm else 0)


def plan_table(model: "str | Path | dict[str, Any] | ModelShapes", n_ctx: int = 4096, kv_type: str = "f16",
               quants: Iterable[str] | None = None, mmproj_quant: str | None = None) -> list[Estimate]:
    """One estimate per type (every catalog type by default; imatrix types assume one is given)."""
    shapes = model if isinstance(model, ModelShapes) else load_shapes(model)
    return [estimate(shapes, q, mmproj_quant, n_ctx, kv_type) for q in (quants or catalog.names())]


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def format_plan(rows: list[Estimate]) -> str:
    """The --plan table: sizes in MB (10^6 bytes)."""
    head = ("type", "bpw", "text MB", "mmproj", "mmproj MB", "KV MB", "compute MB", "run MB", "imatrix")
    lines = [head]
    for e in rows:
        t = catalog.lookup(e.quant)
        n = sum(int(np.prod(x.shape)) for x in e.text.tensors)
        lines.append((e.quant, f"{8 * e.text.tensor_bytes / n:.2f}", _mb(e.text.bytes), e.mmproj_quant,
                      _mb(e.mmproj.bytes) if e.mmproj else "-", _mb(e.kv_bytes),
                      _mb(e.compute_bytes + e.vision_compute_bytes), _mb(e.total_runtime_bytes),
                      "required" if t.needs_imatrix else ""))
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) if i not in (0, 3, 8) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
           for r in lines]
    if rows:
        out.append(f"(n_ctx {rows[0].n_ctx}, KV cache {rows[0].kv_type}; run MB = weights + KV + compute buffers)")
    return "\n".join(out)
