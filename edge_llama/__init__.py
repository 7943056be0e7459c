"""The one llama.cpp access layer: what llama-cpp-python does not bind (ggml devices, RPC)."""
