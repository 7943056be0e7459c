"""Everything about Qwen3-VL (dense) in one package, as mlx-vlm's models/qwen3_vl.

- `arch`: tensor-name map and GGUF metadata (the converter's ArchSpec), `config`: typed configs;
- `chat_format`: placeholder tokens, default template, end-of-turn strings, think tags;
- `vision`: the image and video processors' defaults (token bounds, patch, merge, grounding
  minimum, video fps / frame bounds / temporal patch);
- `reference`: the transformers model; `synthetic`: random-weight checkpoints; `calibration`:
  model inputs for importance matrices. These three need torch/transformers and are imported
  only by what uses them (a Pi runs the runtime without torch).
"""
