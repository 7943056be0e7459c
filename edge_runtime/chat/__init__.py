"""Conversations over the core: `VisionChat`, OpenAI-style messages, the GGUF's chat template,
tool calls, grounding boxes and conversations saved to disk."""
