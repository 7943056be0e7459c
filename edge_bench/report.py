"""From worker results to what people read: summaries, ratios, roofline, markdown, JSON.

Pure functions over plain data: nothing here runs a model, so the report can
be rebuilt and tested from a saved JSON or from hand-made results.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .options import (CHAT_HANDLER, RAW, RSS_TARGET_BYTES, RSS_TARGET_CONFIG, RSS_TARGET_N_CTX, RUNTIME,
                      TRANSFORMERS, BenchOptions, Config, Measure)
from .roofline import Roofline, kv_bytes_read
from .runner import ConfigRuns
from .summary import Summary, ratio, summarize_all
from .workers import WorkerResult

SCHEMA_VERSION = 1
MB = 1e6



@dataclass(frozen=True)
class RatioSpec:
    """numerator party / denominator party on one figure's medians, with the issue's expectation if any."""

    num: str
    den: str
    figure: str
    meaning: str
    op: str = ""  # ">=", ">", "<" or "" (no expectation)
    threshold: float | None = None

    @property
    def heading(self) -> str:
        return self.meaning + (f" ({self.op} {self.threshold:g})" if self.threshold is not None else "")


RATIOS: dict[str, RatioSpec] = {
    "decode_vs_raw": RatioSpec(RUNTIME, RAW, "decode_tok_s", "VisionChat decode / raw llama.cpp decode", ">=", 0.97),
    "ttft_first_vs_raw": RatioSpec(RUNTIME, RAW, "ttft_first_s", "first-question TTFT VisionChat / raw llama.cpp"),
    "followup_ttft_vs_raw": RatioSpec(RUNTIME, RAW, "ttft_followup_s", "follow-up TTFT VisionChat / raw llama.cpp"),
    "followup_ttft_vs_chat_handler": RatioSpec(RUNTIME, CHAT_HANDLER, "ttft_followup_s",
                                               "follow-up TTFT VisionChat / llama-cpp-python chat handler", "<", 0.2),
    "decode_vs_chat_handler": RatioSpec(RUNTIME, CHAT_HANDLER, "decode_tok_s",
                                        "VisionChat decode / llama-cpp-python chat handler decode"),
    "decode_vs_transformers": RatioSpec(RUNTIME, TRANSFORMERS, "decode_tok_s",
                                        "VisionChat decode / transformers bf16 decode", ">", 4.0),
}
PARTY_NAMES = {RUNTIME: "VisionChat", RAW: "raw llama.cpp", CHAT_HANDLER: "llama-cpp-python chat handler",
               TRANSFORMERS: "transformers bf16"}


@dataclass
class PartyFigures:
    """One party's summarised figures for one configuration."""

    kind: str
    figures: dict[str, Summary]
    values: dict[str, float | int]
    peak_rss_bytes: int
    notes: list[str]
    error: str | None
    samples: dict[str, list[float]]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PartyFigures":
        samples = {k: list(v) for k, v in d.get("samples", {}).items()}
        return cls(d["kind"], summarize_all(samples), dict(d.get("values", {})), int(d.get("peak_rss_bytes", 0)),
                   list(d.get("notes", [])), d.get("error"), samples)

    @classmethod
    def from_result(cls, r: WorkerResult) -> "PartyFigures":
        return cls(r.kind, summarize_all(r.samples), dict(r.values), r.peak_rss_bytes, list(r.notes), r.error,
                   {k: list(v) for k, v in r.samples.items()})

    def get(self, name: str) -> Summary | None:
        return self.figures.get(name)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "figures": {k: s.to_dict() for k, s in self.figures.items()},
                "values": self.values, "peak_rss_bytes": self.peak_rss_bytes, "notes": self.notes,
                "error": self.error, "samples": self.samples}


@dataclass
class ConfigReport:
    config: Config
    parties: dict[str, PartyFigures]
    text_bytes: int
    mmproj_bytes: int
    ratios: dict[str, float | None] = field(default_factory=dict)
    roofline: Roofline | None = None
    memory: list[dict[str, Any]] = field(default_factory=list)  # peak-RSS breakdown rows
    accuracy: dict[str, Any] | None = None  # divergence from the float files

    @property
    def runtime(self) -> PartyFigures | None:
        return self.parties.get(RUNTIME)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConfigReport":
        roof = d.get("roofline")
        return cls(Config.from_dict(d["config"]), {k: PartyFigures.from_dict(p) for k, p in d["parties"].items()},
                   int(d.get("text_bytes", 0)), int(d.get("mmproj_bytes", 0)), dict(d.get("ratios", {})),
                   Roofline(roof["weight_bytes"], roof["kv_bytes"], roof["bandwidth_bytes_s"], roof["decode_tok_s"])
                   if roof else None, list(d.get("memory", [])), d.get("accuracy"))

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "label": self.config.label, "text_bytes": self.text_bytes,
                "mmproj_bytes": self.mmproj_bytes, "parties": {k: p.to_dict() for k, p in self.parties.items()},
                "ratios": self.ratios, "roofline": self.roofline.to_dict() if self.roofline else None,
                "memory": self.memory, "accuracy": self.accuracy}


@dataclass
class BenchReport:
    model: str
    machine: dict[str, Any]
    options: BenchOptions
    bandwidth: dict[str, Any] | None
    configs: list[ConfigReport]
    convert: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, "model": self.model, "machine": self.machine,
                "options": self.options.to_dict(), "bandwidth": self.bandwidth,
                "configs": [c.to_dict() for c in self.configs], "rss_target": rss_target(self),
                "convert": self.convert}

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchReport":
        """A report read back from --json output (to re-render or compare runs)."""
        if d.get("schema") != SCHEMA_VERSION:
            # a plain ValueError: render() in edge-bench's CLI turns it into exit 2 naming the file
            raise ValueError(f"unsupported edge-bench JSON schema {d.get('schema')!r} (expected {SCHEMA_VERSION})")
        return cls(d["model"], d["machine"], BenchOptions.from_dict(d["options"]), d.get("bandwidth"),
                   [ConfigReport.from_dict(c) for c in d["configs"]], list(d.get("convert", [])))

    @classmethod
    def read_json(cls, path: str | Path) -> "BenchReport":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


# ---------------------------------------------------------------- building


def image_tokens(party: PartyFigures | None) -> int | None:
    return None if party is None or party.values.get("image_tokens") is None else int(party.values["image_tokens"])


def compute_ratios(parties: dict[str, PartyFigures]) -> dict[str, float | None]:
    """Each pair's ratio; a TTFT ratio not between parties that saw the image at unequal tokens (None:
    a faster answer about a smaller image is no comparison). A party that cannot report its tokens
    (llama-cpp-python's chat handler: llama.cpp's default budget, as raw llama.cpp) is compared, and the
    table says its count is unknown."""
    out = {}
    for name, spec in RATIOS.items():
        a, b = parties.get(spec.num), parties.get(spec.den)
        ta, tb = image_tokens(a), image_tokens(b)
        unequal = spec.figure.startswith("ttft") and None not in (ta, tb) and ta != tb
        out[name] = None if unequal else ratio(a.get(spec.figure) if a else None, b.get(spec.figure) if b else None)
    return out


def fidelity(party: PartyFigures, native: int | None) -> str:
    """Tokens per image and their share of the model's native budget (its processor at max_pixels)."""
    tokens = image_tokens(party)
    if tokens is None:
        return "–"
    return f"{tokens} ({tokens / native:.0%})" if native else str(tokens)


def compute_roofline(runtime: PartyFigures | None, weight_bytes: int, n_ctx: int,
                     bandwidth_bytes_s: float | None) -> Roofline | None:
    if runtime is None or not bandwidth_bytes_s or runtime.get("decode_tok_s") is None:
        return None
    v = runtime.values
    kv = kv_bytes_read(int(v.get("kv_cache_bytes", 0)), n_ctx, int(v.get("prompt_tokens", 0)),
                       int(v.get("decode_tokens", 0)))
    return Roofline(weight_bytes, kv, bandwidth_bytes_s, runtime.figures["decode_tok_s"].median)


def build_config_report(runs: ConfigRuns, *, text_bytes: int, mmproj_bytes: int, weight_bytes: int, n_ctx: int,
                        bandwidth_bytes_s: float | None) -> ConfigReport:
    parties = {kind: PartyFigures.from_result(r) for kind, r in runs.runs.items()}
    rep = ConfigReport(runs.config, parties, text_bytes, mmproj_bytes)
    rep.ratios = compute_ratios(parties)
    rep.roofline = compute_roofline(parties.get(RUNTIME), weight_bytes, n_ctx, bandwidth_bytes_s)
    rep.memory = [memory_row(r) for r in runs.memory]
    if runs.accuracy is not None:
        rep.accuracy = {"error": runs.accuracy.error, **runs.accuracy.values}
    return rep


MEMORY_STAGES = ("model", "context", "projector", "image", "decode")


def memory_row(r: WorkerResult) -> dict[str, Any]:
    """One breakdown variant: RSS after each loading step, the peak and an indicative decode rate."""
    v = r.values
    decode = summarize_all(r.samples).get("decode_tok_s")
    return {"variant": r.variant or {}, "error": r.error, "peak_rss_bytes": r.peak_rss_bytes,
            "stages": {s: v.get(f"rss_{s}") for s in MEMORY_STAGES if v.get(f"rss_{s}") is not None},
            "image_tokens": v.get("image_tokens"), "decode_tok_s": decode.median if decode else None,
            "image_prompt_s": r.samples.get("image_prompt_s", [None])[0],
            "meets_target": bool(r.peak_rss_bytes) and r.peak_rss_bytes <= RSS_TARGET_BYTES}


def rss_target(report: BenchReport) -> dict[str, Any] | None:
    """The issue's memory target, checked on its configuration when it was measured."""
    if report.options.measure.n_ctx != RSS_TARGET_N_CTX:
        return None
    for c in report.configs:
        if c.config == RSS_TARGET_CONFIG and c.runtime and c.runtime.peak_rss_bytes:
            rss = c.runtime.peak_rss_bytes
            return {"config": c.config.label, "n_ctx": RSS_TARGET_N_CTX, "peak_rss_bytes": rss,
                    "target_bytes": RSS_TARGET_BYTES, "met": rss <= RSS_TARGET_BYTES,
                    "image_max_tokens": report.options.measure.image_max_tokens,
                    "n_batch": report.options.measure.n_batch}
    return None


# ---------------------------------------------------------------- formatting


def fmt_num(x: float | None) -> str:
    if x is None:
        return "–"
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_summary(s: Summary | None, scale: float = 1.0) -> str:
    if s is None:
        return "–"
    if s.n < 2 or s.spread == 0:
        return fmt_num(s.median * scale)
    return f"{fmt_num(s.median * scale)} ±{fmt_num(s.spread * scale)}"


def fmt_bytes_mb(n: float | None) -> str:
    return "–" if not n else f"{n / MB:.0f}"


def fmt_ratio(value: float | None, op: str, threshold: float | None) -> str:
    if value is None:
        return "–"
    text = f"{value:.2f}" if value < 100 else f"{value:.0f}"
    if threshold is None:
        return text
    ok = {">=": value >= threshold, ">": value > threshold, "<": value < threshold, "<=": value <= threshold}[op]
    return f"{text} {'✅' if ok else '❌'}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _cfg_cells(c: Config) -> list[str]:
    quant = c.quant if c.bufts == "auto" else f"{c.quant} (bufts {c.bufts})"  # --extra-bufts rows side by side
    return [quant, c.mmproj_quant, c.kv_type, str(c.resolution)]


def runtime_table(report: BenchReport) -> list[str]:
    lengths = report.options.measure.prompt_lengths
    header = ["quant", "mmproj", "KV", "image", "load s", "encode s", "img tok",
              *[f"prefill tok/s @{n}" for n in lengths], "decode tok/s", "TTFT first s", "TTFT follow-up s",
              "peak RSS MB", "KV MB", "text MB", "mmproj MB"]
    rows = []
    for c in report.configs:
        p = c.runtime
        if p is None or p.error:
            rows.append(_cfg_cells(c.config) + ["failed"] + [""] * (len(header) - 5))
            continue
        rows.append(_cfg_cells(c.config) + [
            fmt_summary(p.get("load_s")), fmt_summary(p.get("image_encode_s")),
            str(p.values.get("image_tokens", "–")),
            *[fmt_summary(p.get(f"prefill_tok_s@{n}")) for n in lengths],
            fmt_summary(p.get("decode_tok_s")), fmt_summary(p.get("ttft_first_s")),
            fmt_summary(p.get("ttft_followup_s")), fmt_bytes_mb(p.peak_rss_bytes),
            fmt_bytes_mb(p.values.get("kv_cache_bytes")), fmt_bytes_mb(c.text_bytes), fmt_bytes_mb(c.mmproj_bytes),
        ])
    return _table(header, rows)


def baseline_table(report: BenchReport) -> list[str]:
    header = ["config", "party", "load s", "encode s", "image tokens (of native)", "decode tok/s", "TTFT first s",
              "TTFT follow-up s", "peak RSS MB"]
    rows, shown = [], set()
    for c in report.configs:
        for kind in (RUNTIME, RAW, CHAT_HANDLER, TRANSFORMERS):
            p = c.parties.get(kind)
            if p is None or (kind == TRANSFORMERS and c.config.resolution in shown):
                continue
            if kind == TRANSFORMERS:
                shown.add(c.config.resolution)  # one checkpoint run serves every quant of its resolution
            label = c.config.label if kind != TRANSFORMERS else f"bf16 checkpoint {c.config.resolution}"
            if p.error:
                rows.append([label, PARTY_NAMES[kind], "failed: " + p.error[:80].replace("|", "/"), "", "", "", "",
                             "", ""])
                continue
            runtime = c.parties.get(RUNTIME)
            native = runtime.values.get("native_image_tokens") if runtime is not None else None
            rows.append([label, PARTY_NAMES[kind], fmt_summary(p.get("load_s")), fmt_summary(p.get("image_encode_s")),
                         fidelity(p, native), fmt_summary(p.get("decode_tok_s")), fmt_summary(p.get("ttft_first_s")),
                         fmt_summary(p.get("ttft_followup_s")), fmt_bytes_mb(p.peak_rss_bytes)])
    return _table(header, rows)


def ratio_table(report: BenchReport) -> list[str]:
    names = [n for n in RATIOS if any(c.ratios.get(n) is not None or ratio_cell(c, n).startswith("not compared")
                                      for c in report.configs)]
    header = ["config"] + [RATIOS[n].heading for n in names]
    rows = [[c.config.label] + [ratio_cell(c, n) for n in names] for c in report.configs]
    return _table(header, rows) if names else ["(no baseline ran)"]


def ratio_cell(c: "ConfigReport", name: str) -> str:
    """A ratio with the image tokens each side saw (TTFT ratios), or why it was not taken."""
    spec = RATIOS[name]
    if not spec.figure.startswith("ttft"):
        return fmt_ratio(c.ratios.get(name), spec.op, spec.threshold)
    a, b = image_tokens(c.parties.get(spec.num)), image_tokens(c.parties.get(spec.den))
    if a != b and a is not None and b is not None:
        return f"not compared: {a} vs {b} image tokens"
    value = fmt_ratio(c.ratios.get(name), spec.op, spec.threshold)
    if value == "–":
        return value
    return f"{value} (both {a} image tokens)" if a == b else f"{value} ({a or '?'} vs {b or '?'} image tokens)"


def roofline_table(report: BenchReport) -> list[str]:
    rows = [[c.config.label, fmt_num(c.roofline.weight_bytes / MB), fmt_num(c.roofline.kv_bytes / MB),
             fmt_num(c.roofline.decode_tok_s), fmt_num(c.roofline.bound_tok_s), f"{c.roofline.fraction:.0%}"]
            for c in report.configs if c.roofline]
    header = ["config", "weights read MB/token", "KV read MB/token", "decode tok/s", "bandwidth bound tok/s",
              "of roofline"]
    return _table(header, rows) if rows else ["(no decode rate or no bandwidth measurement)"]


def target_advice(report: BenchReport) -> str:
    """What the memory breakdown says it takes to meet the RSS target."""
    rows = [r for c in report.configs if c.config == RSS_TARGET_CONFIG for r in c.memory if not r["error"]]
    if not rows:
        return "(run with --memory-breakdown to see which load settings meet it)"
    best = min(rows, key=lambda r: r["peak_rss_bytes"])
    meeting = [r["variant"].get("name", "?") for r in rows if r["meets_target"]]
    text = (f"Lowest peak in the breakdown below: {best['peak_rss_bytes'] / 1e9:.2f} GB with "
            f"'{best['variant'].get('name', '?')}'. ")
    return text + (f"Settings that meet the target: {'; '.join(meeting)}." if meeting
                   else "None of the tried load settings meets the target.")


def memory_table(rows: list[dict[str, Any]]) -> list[str]:
    header = ["load settings", *[f"after {s} MB" for s in MEMORY_STAGES], "peak MB", "img tok",
              "image prompt s", "decode tok/s", f"<= {RSS_TARGET_BYTES / 1e9:.1f} GB"]
    body = []
    for r in rows:
        name = r["variant"].get("name", "?")
        if r["error"]:
            body.append([name, "failed: " + r["error"][:80]] + [""] * (len(header) - 2))
            continue
        stages = [fmt_bytes_mb(r["stages"].get(s)) for s in MEMORY_STAGES]
        body.append([name, *stages, fmt_bytes_mb(r["peak_rss_bytes"]), str(r["image_tokens"] or "–"),
                     fmt_num(r.get("image_prompt_s")), fmt_num(r["decode_tok_s"]),
                     "✅" if r["meets_target"] else "❌"])
    return _table(header, body)


def accuracy_table(report: BenchReport) -> list[str]:
    header = ["config", "KL mean", "KL p99", "KL max", "top-1 agree", "logit rel. RMSE", "image cos mean",
              "image cos min"]
    rows = []
    for c in report.configs:
        a = c.accuracy
        if a is None:
            continue
        if a.get("error"):
            rows.append([c.config.label, "failed: " + a["error"][:80]] + [""] * (len(header) - 2))
            continue
        top1 = a.get("top1_agreement")
        rows.append([c.config.label, *(f"{a[k]:.2e}" if a.get(k) is not None else "–"
                                       for k in ("kl_mean", "kl_p99", "kl_max")),
                     f"{top1:.1%}" if top1 is not None else "–",
                     *(f"{a[k]:.4f}" if a.get(k) is not None else "–"
                       for k in ("logit_rel_rmse", "image_cosine_mean", "image_cosine_min"))])
    return _table(header, rows)


def notes_lines(report: BenchReport) -> list[str]:
    """Each party's notes once (they describe the method), then every failure with its configuration."""
    notes, errors = [], []
    for c in report.configs:
        for kind, p in c.parties.items():
            notes += [f"- {PARTY_NAMES[kind]}: {n}" for n in p.notes]
            if p.error:
                errors.append(f"- {c.config.label}, {PARTY_NAMES[kind]} failed: {p.error}")
    return list(dict.fromkeys(notes + errors))


def load_text(m: Measure) -> str:
    """How every party loaded the weights, as VisionChat resolved the settings on this machine."""
    mmap, n_ubatch = m.load_settings()
    return (f"n_ubatch {n_ubatch}, weights {'mmap' if mmap else 'read (no mmap)'}"
            f"{'' if m.repack else ', no repack'}")


def to_markdown(report: BenchReport) -> str:
    m = report.options.measure
    bw = report.bandwidth
    out = [f"## edge-bench: {report.model}", "",
           f"Machine: {report.machine.get('summary', '')}", "",
           f"Settings: {m.threads} threads, n_ctx {m.n_ctx}, n_batch {m.n_batch}, {load_text(m)}, flash attention "
           f"{'on' if m.flash_attn else 'off'}, GPU layers {m.n_gpu_layers}, "
           + (f"RPC workers {', '.join(m.rpc_servers)} (shares {m.tensor_split or 'by free memory'}), "
              if m.rpc_servers else "")
           + (f"MoE experts of {m.n_cpu_moe} blocks in host RAM, " if m.n_cpu_moe != "auto" else "")
           + (f"tensor overrides {' '.join(m.override_tensor)}, " if m.override_tensor else "")
           + f"image_max_tokens "
           f"{m.image_max_tokens or 'projector default'}, {m.decode_tokens} decoded tokens; "
           f"each figure is the median of {m.repeats * report.options.passes} runs ({report.options.passes} "
           f"alternating pass(es) of {m.warmup} warm-up + {m.repeats} measured) ± half their range. "
           "Decode tok/s is 1 / the median gap between generated tokens (a burst of another process moves "
           "the mean, not the median; the mean is in the JSON as decode_mean_tok_s).", ""]
    if bw:
        out += [f"Memory read bandwidth: {bw['gb_s']:.1f} GB/s ({bw['threads']} thread(s), "
                f"{bw['buffer_bytes'] / 2**20:.0f} MiB buffer).", ""]
    out += ["### VisionChat", ""] + runtime_table(report) + [""]
    if any(len(c.parties) > 1 for c in report.configs):
        out += ["### Baselines (same files, threads and context)", ""] + baseline_table(report) + [""]
        out += ["### Ratios, pair by pair (medians)", ""] + ratio_table(report) + [""]
    out += ["### Roofline (decode vs memory bandwidth)", ""] + roofline_table(report) + [""]
    if any(c.accuracy for c in report.configs):
        out += ["### Accuracy against the float files (next-token KL and logit error, teacher-forced; "
                "projector embedding cosine)", ""] + accuracy_table(report) + [""]
    target = rss_target(report)
    if target:
        verdict = "met" if target["met"] else "NOT met"
        out += ["### Peak RSS target", "",
                f"VisionChat, {target['config']}, n_ctx {target['n_ctx']}: peak RSS "
                f"{target['peak_rss_bytes'] / 1e9:.2f} GB ({target['peak_rss_bytes'] / 2**30:.2f} GiB), target <= "
                f"{RSS_TARGET_BYTES / 1e9:.1f} GB: {verdict}."]
        out += [target_advice(report), ""]
    for c in report.configs:
        if c.memory:
            out += [f"### Where the memory goes: {c.config.label}, n_ctx {m.n_ctx} (low-level loads, one process each)",
                    ""] + memory_table(c.memory) + [""]
    if report.convert:
        out += ["### Converter (edge-convert)", ""] + convert_table(report.convert) + [""]
    notes = notes_lines(report)
    if notes:
        out += ["### Notes", ""] + notes + [""]
    return "\n".join(out)


def convert_table(rows: list[dict[str, Any]]) -> list[str]:
    header = ["target", "how", "wall s", "peak RSS MB", "output MB"]
    body = [[r["target"], r["how"], f"{r['wall_s']:.0f}", fmt_bytes_mb(r["peak_rss_bytes"]),
             fmt_bytes_mb(r.get("output_bytes"))] if not r.get("error") else [r["target"], "failed: " + r["error"][:80],
                                                                               "", "", ""]
            for r in rows]
    return _table(header, body)
