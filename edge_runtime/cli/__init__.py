"""The runtime's commands: `edge-chat`, `edge-rpc-worker` and the runtime half of `make demo`."""
