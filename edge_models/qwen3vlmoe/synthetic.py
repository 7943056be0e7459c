"""Random-weight Qwen3-VL MoE checkpoints: the dense builder with experts, a router and an expert layout.

The config layout picks the expert layout, as in real files: `hf4` writes what
the hub holds (transformers 4.57: `gate_up_proj` [experts, hidden, 2*ff]),
`hf5` what transformers 5 saves ([experts, 2*ff, hidden]); config.json's
`transformers_version` says which. The same seed gives the same weights in
both layouts. Needs the `convert` extra.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ..qwen3vl.synthetic import SyntheticSpec, build_checkpoint
from .arch import EXPERTS
from .reference import tensor_shapes


@dataclass(frozen=True)
class MoeSyntheticSpec(SyntheticSpec):
    experts: int = 6
    experts_used: int = 2
    moe_ff: int = 48
    tied: bool = False  # the MoE models ship an lm_head

    def make_config(self, ids: dict[str, int], n_tokens: int) -> dict[str, Any]:
        config = super().make_config(ids, n_tokens)
        config["architectures"] = ["Qwen3VLMoeForConditionalGeneration"]
        config["model_type"] = "qwen3_vl_moe"
        config["text_config"].update({
            "model_type": "qwen3_vl_moe_text", "num_experts": self.experts, "num_experts_per_tok": self.experts_used,
            "moe_intermediate_size": self.moe_ff, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "norm_topk_prob": True,
        })
        config["vision_config"]["model_type"] = "qwen3_vl_moe" if self.layout == "hf4" else "qwen3_vl_moe_vision"
        return config

    def weight_shapes(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        import transformers

        if int(transformers.__version__.split(".")[0]) < 5:  # 4.57 creates the hub layout; stored() assumes 5's
            raise RuntimeError(f"building MoE checkpoints needs transformers 5 (found {transformers.__version__}).")
        return tensor_shapes(config)

    def stored(self, name: str, tensor):
        # transformers 5 creates [experts, out, in]; the hub (4.57) stores [experts, in, out].
        return tensor.transpose(1, 2) if self.layout == "hf4" and EXPERTS.fullmatch(name) else tensor

    def validate(self) -> None:
        super().validate()
        if not 0 < self.experts_used <= self.experts:
            # a plain ValueError: test/bench checkpoint specs written in code: a programming error
            raise ValueError(f"experts_used must be in 1..experts ({self.experts}), got {self.experts_used}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--layout", default="hf5", show_default=True, type=click.Choice(["hf4", "hf5"]),
              help="config.json and expert layout of transformers 4.57 (hub) or 5.")
@click.option("--text-layers", type=click.IntRange(min=2), help="Text layers (default 4).")
@click.option("--experts", default=6, show_default=True, type=click.IntRange(min=1))
@click.option("--experts-used", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--dtype", default="bf16", show_default=True, type=click.Choice(["bf16", "f16", "f32"]))
def main(out_dir: Path, layout: str, text_layers: int | None, experts: int, experts_used: int, dtype: str) -> None:
    """Build a tiny random-weight Qwen3-VL MoE checkpoint in OUT_DIR."""
    path = build_checkpoint(out_dir, MoeSyntheticSpec(layout=layout, dtype=dtype, text_layers=text_layers,
                                                      experts=experts, experts_used=experts_used))
    click.echo(json.dumps({"checkpoint": str(path)}))


if __name__ == "__main__":
    main()
