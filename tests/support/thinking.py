"""A converted tiny model re-labelled as a Thinking model: the same files with another chat template.

The template lives in the GGUF (tokenizer.chat_template), which is what edge-serve and VisionChat
read; gguf-py's own metadata copier writes the new file, so nothing of the runtime is involved.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import gguf
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from edge_common.manifest import resolve_model_paths


def with_chat_template(src_dir: Path, dst_dir: Path, template: str) -> Path:
    """A copy of the converter output `src_dir` at `dst_dir` whose text model carries `template`."""
    if dst_dir.exists():
        return dst_dir
    tmp = dst_dir.with_name(dst_dir.name + ".partial")
    shutil.copytree(src_dir, tmp)
    model, _ = resolve_model_paths(tmp)
    reader = gguf.GGUFReader(str(model))
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    out = model.with_suffix(".new")
    writer = gguf.GGUFWriter(str(out), arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    new = {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING, template)}
    copy_with_new_metadata(reader, writer, new, [])
    del reader
    out.replace(model)
    tmp.rename(dst_dir)
    return dst_dir


def token_id(model_dir: Path, text: str) -> int:
    """The id of the vocab entry spelled `text`, read from the GGUF's token list."""
    model, _ = resolve_model_paths(model_dir)
    tokens = gguf.GGUFReader(str(model)).get_field(gguf.Keys.Tokenizer.LIST).contents()
    return tokens.index(text)
