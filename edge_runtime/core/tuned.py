"""Load settings measured on this device (`edge-bench --tune`), used as defaults where the caller set none.

Which of repack, flash attention, threads, ubatch and KV type is fastest depends on the device
(a Zen 4 loses prompt speed to repacking that a Xeon gains; flash attention helps decode at short
context and hurts it at long context on some CPUs), so rules cannot pick them; a measurement can.
`edge-bench --tune` sweeps them for one model pair and stores the winners per workload, with every
measured value, in `tuned-settings.json` in the user cache dir, keyed by this device and the pair.
Loading reads that entry for the settings the caller left at their "unset" value (None, or "auto"
for flash attention): an explicit setting always wins, and with no entry nothing changes. A file
that cannot be read or does not hold what this module writes is ignored with a warning: tuning is
an optimisation, never a reason for a load to fail.

Nothing tunes in the background: on a 2-core CPU the sweep's every point reloads the model and
encodes an image (about 20 s each), far from the "few seconds" a first load may spend.
"""
from __future__ import annotations

import json
import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Mapping

from edge_common.atomic import atomic_output
from edge_llama.hardware import cpu_identity, physical_cores
from edge_runtime.errors import OptionError, TunedSettingsError
from edge_runtime.vision.disk_cache import user_cache_dir

log = logging.getLogger("edge_runtime")

TUNED_FILE = "tuned-settings.json"
FORMAT = "qwen3-vl-edge tuned settings 1"
IMAGE, CHAT = "image", "chat"  # first-image TTFT decides / decode tok/s decides
ENCODER_ONLY = ("mmproj_flash_attn",)  # settings of the image encoder alone
WORKLOADS = (IMAGE, CHAT)
# EngineOptions field -> (its "unset" value, the value a load without tuning resolves it to,
# a check of a stored value): tuned values replace only the unset value.
TUNABLE: dict[str, tuple[Any, Any, Any]] = {
    "repack": (None, True, lambda v: isinstance(v, bool)),
    "flash_attn": ("auto", "auto", lambda v: isinstance(v, bool)),
    "mmproj_flash_attn": ("auto", "auto", lambda v: isinstance(v, bool)),
    "threads": (None, None, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "n_ubatch": (None, None, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "kv_cache_type_k": (None, "f16", lambda v: v in ("f16", "q8_0", "q4_0", "bf16", "f32")),
    "kv_cache_type_v": (None, "f16", lambda v: v in ("f16", "q8_0", "q4_0", "bf16", "f32")),
}


def tuned_dir(option: str | None) -> Path | None:
    """The directory the tuned file lives in: "auto" the user cache dir, None no tuning."""
    if option is None:
        return None
    return user_cache_dir() if option == "auto" else Path(option).expanduser()


def device_id() -> str:
    """This machine as the settings depend on it: CPU model, its vector features and core count."""
    return f"{cpu_identity()}|cores={physical_cores()}"


def tuned_key(model_path: str | Path, mmproj_path: str | Path | None) -> str:
    """The entry's key: this device and this model pair (file names and sizes, as the cost key has them)."""
    parts = [device_id()]
    for p in (model_path, mmproj_path):
        if p is not None:
            p = Path(p)
            parts.append(f"{p.name}:{p.stat().st_size}")
    return "|".join(parts)


def _read(path: Path) -> dict:
    """The file's entries; {} when absent; raises ValueError naming what is wrong when it is damaged."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise TunedSettingsError(f"cannot be read ({exc.strerror})") from None
    try:
        table = json.loads(text)
    except ValueError:
        raise TunedSettingsError("is not JSON") from None
    if not isinstance(table, dict) or table.get("format") != FORMAT or not isinstance(table.get("entries"), dict):
        raise TunedSettingsError(f"is not a tuned-settings file (no \"format\": \"{FORMAT}\")")
    return table["entries"]


def check_settings(settings: Any) -> dict[str, Any]:
    """The stored settings as EngineOptions fields; ValueError naming the first bad one."""
    if not isinstance(settings, dict):
        raise TunedSettingsError("settings are not an object")
    for name, value in settings.items():
        if name not in TUNABLE or not TUNABLE[name][2](value):
            raise TunedSettingsError(f"setting {name}={value!r} is not a tunable setting")
    return dict(settings)


def save_tuned(cache_dir: Path, key: str, entry: Mapping[str, Any]) -> Path:
    """Stores `entry` ({"workloads": {workload: {"settings", "why"}}, "sweep": [...]}) under `key`,
    keeping the other devices' and models' entries (a damaged file is replaced)."""
    for workload, choice in entry["workloads"].items():
        if workload not in WORKLOADS:
            raise OptionError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
        check_settings(choice["settings"])
    path = Path(cache_dir) / TUNED_FILE
    try:
        entries = _read(path)
    except ValueError:
        entries = {}
    entries[key] = dict(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, unique=True) as tmp:
        tmp.write_text(json.dumps({"format": FORMAT, "entries": entries}, indent=1) + "\n", encoding="utf-8")
    return path


def load_tuned(cache_dir: Path | None, key: str, workload: str) -> dict[str, Any] | None:
    """The settings tuned for `workload` under `key`, or None (none stored, or a file not to trust: warned)."""
    if cache_dir is None:
        return None
    path = Path(cache_dir) / TUNED_FILE
    try:
        entry = _read(path).get(key)
        if entry is None:
            return None
        choice = entry["workloads"][workload]
        return check_settings(choice["settings"])
    except KeyError:
        return None  # this pair was tuned, but not for this workload
    except (ValueError, TypeError) as exc:
        log.warning("ignoring tuned settings %s: it %s; rerun edge-bench --tune or delete it", path,
                    str(exc) if str(exc).startswith(("is ", "cannot")) else f"has a bad entry ({exc})")
        return None


def apply_tuned(options: Any, model_path: Path, mmproj_path: Path | None) -> tuple[Any, dict[str, Any], Path | None]:
    """(options with tuned values for the fields left unset and the rest resolved as before, the tuned
    values used, the file they came from)."""
    directory = tuned_dir(options.tuned_dir)
    workload = options.workload if options.workload != "auto" else (IMAGE if mmproj_path else CHAT)
    used: dict[str, Any] = {}
    if directory is not None:
        tuned = load_tuned(directory, tuned_key(model_path, mmproj_path), workload) or {}
        used = {k: v for k, v in tuned.items() if getattr(options, k) == TUNABLE[k][0]}
    names = {f.name for f in fields(options)}
    resolved = {k: (used[k] if k in used else TUNABLE[k][1]) for k in TUNABLE
                if k in names and getattr(options, k) == TUNABLE[k][0]}
    return replace(options, **resolved), used, (directory / TUNED_FILE) if used else None


# A measured value must beat the default's by this much to replace it: closer than that is the
# noise of one measurement, and a default that is not wrong need not change.
MARGIN = 0.03


def choose(points: list[Mapping[str, Any]], workload: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(settings, why) for `workload` from a one-variable-at-a-time sweep.

    `points[0]` is the defaults; each other point changes one setting (`"vary"`, its name; `"settings"`,
    the values) and carries "ttft_s" (first image) and "decode_tok_s" (and, for flash attention,
    "decode_long_tok_s"). Each setting takes its fastest value for the workload: first-image TTFT for
    "image", decode (at long context where measured, as long chats are) for "chat"."""
    if workload not in WORKLOADS:
        raise OptionError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")

    def speed(p: Mapping[str, Any], long: bool) -> float:
        if workload == IMAGE:
            return 1.0 / p["ttft_s"] if p.get("ttft_s") else 0.0
        value = p.get("decode_long_tok_s") if long else None
        return value or p.get("decode_tok_s") or 0.0

    base = points[0]
    settings: dict[str, Any] = {}
    why: dict[str, str] = {}
    gains: dict[str, float] = {}
    for name in dict.fromkeys(p["vary"] for p in points[1:]):
        if workload == CHAT and name in ENCODER_ONLY:  # text decode never runs the encoder: noise only
            why[name] = "default kept (the image encoder's setting; text decode does not use it)"
            continue
        tried = [base] + [p for p in points[1:] if p["vary"] == name]
        long = workload == CHAT and all(p.get("decode_long_tok_s") for p in tried)
        best = max(tried, key=lambda p: speed(p, long))
        if best is not base and speed(best, long) < speed(base, long) * (1 + MARGIN):
            best = base
        unit = "s first-image TTFT" if workload == IMAGE else ("tok/s long-context decode" if long else "tok/s decode")
        measured = ", ".join(f"{p['settings'][name] if p is not base else 'default'}: "
                             f"{(p['ttft_s'] if workload == IMAGE else speed(p, long)):.2f}" for p in tried)
        if best is base:
            why[name] = f"default kept ({measured} {unit})"
        else:
            settings.update(best["changes"])
            gains[name] = speed(best, long) / speed(base, long)
            why[name] = f"{best['settings'][name]} ({measured} {unit})"
    _drop_conflicts(settings, why, gains)
    return settings, why


def _drop_conflicts(settings: dict[str, Any], why: dict[str, str], gains: Mapping[str, float]) -> None:
    """Winners measured one at a time may not combine: llama.cpp needs flash attention for a quantized V
    cache, so of text flash attention off and a quantized KV the smaller gain goes back to its default."""
    if settings.get("flash_attn") is False and settings.get("kv_cache_type_v", "f16") not in ("f16", "bf16", "f32"):
        loser = "kv" if gains.get("kv", 1.0) <= gains.get("flash_attn", 1.0) else "flash_attn"
        if loser == "kv":
            settings.pop("kv_cache_type_k", None)
            settings.pop("kv_cache_type_v", None)
        else:
            settings.pop("flash_attn")
        why[loser] = f"default kept: needs the other ({why[loser]}; a quantized V cache needs flash attention)"
