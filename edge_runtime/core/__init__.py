"""The engine and the per-token core every client drives: loading through edge_llama, KV reuse,
prefill, the batched step, sampling, options and answer stats. VisionChat is a one-sequence
client of it and edge-serve's scheduler a many-sequence one, so an answer is made one way."""
