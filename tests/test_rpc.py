"""Splitting a model over RPC workers (llama.cpp's ggml-rpc) on loopback, with real worker processes.

Two `edge-rpc-worker` children serve this machine's CPU; the tiny model is
split over the local CPU and both workers. Expected answers come from the
same model run locally (llama.cpp alone), the placement from llama.cpp's own
load log, and the failure behaviour from what ggml-rpc does (see edge_llama.rpc).
"""
from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from edge_llama.rpc import (
    WORKER_LOST_EXIT,
    SplitPlan,
    WorkerUnreachableError,
    assign_layers,
    parse_endpoint,
    placement_from_log,
    plan_split,
    probe,
    rpc_supported,
)
from edge_runtime import VisionChat
from edge_runtime.cli.rpc_worker import main as worker_main
from support.rpc import Worker, child_env
from support.server import free_port

GREEDY = {"temperature": 0.0, "max_tokens": 12}
TEXT_Q = "Describe a red bicycle in one sentence."
IMAGE_Q = "What is in this picture?"
# 4 blocks + the output layer = 5 units; shares 1:2:2 put block 0 here, blocks 1-2 on
# the first worker, block 3 and the output on the second (llama-model.cpp's rule, by hand).
SPLIT = (1.0, 2.0, 2.0)


def test_this_build_has_rpc():
    """`make setup` builds llama-cpp-python with GGML_RPC=on; a wheel without it must not slip in."""
    assert rpc_supported()


@pytest.fixture(scope="module")
def workers():
    pair = [Worker(), Worker()]
    yield pair
    for w in pair:
        code, out, _err = w.stop(signal.SIGTERM)
        assert code == 0 and "stopping (SIGTERM)" in out, "a worker must shut down cleanly on SIGTERM"


def answers(chat: VisionChat, image) -> list[str]:
    out = [chat.ask(TEXT_Q, **GREEDY)]
    chat.reset()
    out.append(chat.ask(IMAGE_Q, images=[image], **GREEDY))
    return out


def test_split_over_two_workers_answers_like_local(tiny_f32_dir, test_image, workers):
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=1024) as local:
        expected = answers(local, test_image)
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=1024, rpc_servers=[str(w) for w in workers],
                             tensor_split=SPLIT) as split:
        got = answers(split, test_image)
        placed = split.engine.device_weights
        worker_devices = [d.name for d in split.engine.placement.workers]
    assert got == expected
    assert all(a for a in got)
    # llama.cpp's own log says where the layers went: the table above
    assert {name: layers for name, (layers, _) in placed.items()} == {
        "CPU": 1, worker_devices[0]: 2, worker_devices[1]: 2}
    assert all(nbytes > 0 for _, nbytes in placed.values())


def test_assign_layers_mirrors_llama_cpp(tiny_f32_dir, workers):
    """Our mirror of llama.cpp's placement rule (used by --plan) agrees with where llama.cpp put the layers."""
    for shares in [(1.0, 1.0, 1.0), (0.0, 1.0, 3.0), (3.0, 1.0, 0.0)]:
        with VisionChat.from_dir(tiny_f32_dir, n_ctx=256, rpc_servers=[str(w) for w in workers],
                                 tensor_split=shares) as chat:
            engine = chat.engine
            names = ["CPU"] + [d.name for d in engine.placement.workers]
            owner = assign_layers(4, engine.placement.plan, 2)
            mirrored = {names[i]: owner.count(i) for i in range(3) if owner.count(i)}
            assert mirrored == {n: layers for n, (layers, _) in engine.device_weights.items() if layers}, shares


def test_wrong_port_fails_fast_with_the_endpoint(tiny_f32_dir):
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(WorkerUnreachableError, match=f"127.0.0.1:{port}.*cannot connect"):
        VisionChat.from_dir(tiny_f32_dir, n_ctx=256, rpc_servers=[f"127.0.0.1:{port}"], rpc_timeout_s=2)
    assert time.monotonic() - t0 < 2 + 1


def test_silent_endpoint_fails_within_the_timeout(tiny_f32_dir, workers):
    """A port that accepts but never speaks RPC (a busy worker, another service) is named after the timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(WorkerUnreachableError, match=f"127.0.0.1:{port}.*no handshake within 1 s"):
            VisionChat.from_dir(tiny_f32_dir, n_ctx=256, rpc_timeout_s=1,
                                rpc_servers=[str(workers[0]), f"127.0.0.1:{port}"])
        assert time.monotonic() - t0 < 1 + 2
    # the engine can be loaded again once the workers are right
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=256, rpc_servers=[str(w) for w in workers]) as chat:
        assert chat.ask(TEXT_Q, temperature=0.0, max_tokens=2)


# A host process that answers forever; the test breaks one of its workers mid-answer.
HOST = textwrap.dedent("""
    import sys
    from edge_runtime import VisionChat
    chat = VisionChat.from_dir(sys.argv[1], n_ctx=2048, rpc_servers=[sys.argv[2]], tensor_split=[1, 1],
                               rpc_stall_s=float(sys.argv[3]))
    print("ANSWERING", flush=True)
    while True:
        chat.reset()
        for piece in chat.stream("Tell me a long story.", temperature=0.0, max_tokens=1500):
            pass
""")


def run_host_then(tiny_dir, worker: Worker, action, stall_s: float = 300) -> tuple[int, str, float]:
    host = subprocess.Popen([sys.executable, "-c", HOST, str(tiny_dir), str(worker), str(stall_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        assert host.stdout.readline().strip() == "ANSWERING", host.stderr.read()
        time.sleep(0.5)
        t0 = time.monotonic()
        action()
        _out, err = host.communicate(timeout=60)
        return host.returncode, err, time.monotonic() - t0
    finally:
        if host.poll() is None:
            host.kill()
            host.communicate()


def test_worker_killed_mid_answer_names_it_and_ends_the_host(tiny_f32_dir):
    """ggml-rpc aborts on a lost connection; the host says which worker and exits 75, not a silent core dump."""
    worker = Worker()
    code, err, waited = run_host_then(tiny_f32_dir, worker, lambda: worker.proc.kill())
    worker.kill()
    assert code == WORKER_LOST_EXIT, err
    assert f"lost RPC worker {worker}" in err
    assert waited < 10


def test_frozen_worker_is_caught_by_the_stall_timeout(tiny_f32_dir):
    """A worker that stops answering without closing its socket (a frozen machine) ends the host after rpc_stall_s."""
    worker = Worker()
    try:
        code, err, waited = run_host_then(tiny_f32_dir, worker, lambda: worker.proc.send_signal(signal.SIGSTOP),
                                          stall_s=2)
    finally:
        worker.proc.send_signal(signal.SIGCONT)
        worker.kill()
    assert code == WORKER_LOST_EXIT, err
    assert f"lost RPC worker {worker}" in err and "no reply within 2 s" in err
    assert waited < 2 + 5


# ------------------------------------------------------------ the worker CLI


def test_worker_refuses_a_public_address_without_allow_remote():
    result = CliRunner().invoke(worker_main, ["--host", "0.0.0.0", "--port", str(free_port())])
    assert result.exit_code == 2
    assert "no authentication" in result.output and "--allow-remote" in result.output


def test_worker_reports_a_busy_port(workers):
    result = CliRunner().invoke(worker_main, ["--port", str(workers[0].port)])
    assert result.exit_code == 2 and f"127.0.0.1:{workers[0].port}" in result.output and "in use" in result.output


def test_worker_rejects_an_unknown_device():
    result = CliRunner().invoke(worker_main, ["--device", "NOPE0", "--port", str(free_port())])
    assert result.exit_code == 2 and "NOPE0" in result.output and "CPU" in result.output


def test_a_busy_worker_is_reported_fast_not_after_the_whole_timeout():
    """A real worker kept busy by another host (a raw client that did the HELLO handshake and stays
    connected): the probe says so within about a second, not after its 5 s timeout; once the host
    leaves, the worker answers again."""
    from edge_llama.rpc import _CONN_CAPS, _RPC_CMD_HELLO, DEFAULT_TIMEOUT_S

    worker = Worker()
    try:
        with socket.create_connection(("127.0.0.1", worker.port), timeout=5) as host:
            host.sendall(struct.pack("<BQ", _RPC_CMD_HELLO, _CONN_CAPS) + bytes(_CONN_CAPS))
            assert len(host.recv(64)) > 0  # the worker now serves this host
            t0 = time.monotonic()
            with pytest.raises(WorkerUnreachableError, match=f"{worker.endpoint}.*serving another host"):
                probe(worker.endpoint)
            took = time.monotonic() - t0
        assert DEFAULT_TIMEOUT_S == 5.0 and took < 2.5, f"the probe took {took:.1f} s"
        assert probe(worker.endpoint, timeout=5) == (7, 0, 0)
    finally:
        worker.kill()


def test_probe_reads_the_protocol_version(workers):
    assert probe(workers[0].endpoint) == (7, 0, 0)  # RPC_PROTO_*_VERSION of ggml-rpc.h in llama.cpp 0.3.36


# ------------------------------------------------------------ pure pieces


@pytest.mark.parametrize("text, ok", [("10.0.0.2:50052", True), ("host:1", True), ("host", False),
                                      ("host:0", False), ("host:70000", False), ("[::1]:50052", False),
                                      (":50052", False)])
def test_parse_endpoint(text, ok):
    if ok:
        assert str(parse_endpoint(text)) == text
    else:
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_endpoint(text)


@pytest.mark.parametrize("n_layer, shares, local_cpu, plan", [
    (28, [1, 1, 1], True, SplitPlan(19, (1.0, 1.0))),   # 29 units, 10 stay local
    (28, [0, 1, 1], True, SplitPlan(29, (1.0, 1.0))),   # all on the workers
    (28, [1, 0, 0], True, SplitPlan(0, (0.0, 0.0))),    # all local
    (4, [1, 2, 2], True, SplitPlan(4, (2.0, 2.0))),
    (28, [2, 1], False, SplitPlan(-1, (2.0, 1.0))),     # local GPU: everything offloaded, shares as given
])
def test_plan_split(n_layer, shares, local_cpu, plan):
    assert plan_split(n_layer, shares, local_cpu) == plan


def test_placement_from_log_reads_llama_cpp_lines():
    lines = [
        "load_tensors: layer   0 assigned to device CPU, is_swa = 0",
        "load_tensors: layer   1 assigned to device RPC0, is_swa = 0",
        "load_tensors: layer   2 assigned to device RPC0, is_swa = 0",
        "load_tensors:   CPU_Mapped model buffer size =     2.50 MiB",
        "load_tensors:   CPU_REPACK model buffer size =     1.50 MiB",
        "load_tensors: RPC0[127.0.0.1:50052] model buffer size =     8.00 MiB",
        "load_tensors: layer   3 assigned to device RPC1, is_swa = 0",
        "load_tensors: RPC0[127.0.0.1:50053] model buffer size =     1.00 MiB",
    ]
    # two workers each call their device RPC0 in buffer names; the host calls them RPC0 and RPC1
    aliases = {"RPC0[127.0.0.1:50052]": "RPC0", "RPC0[127.0.0.1:50053]": "RPC1"}
    assert placement_from_log(lines, aliases) == {"CPU": (1, 4 << 20), "RPC0": (2, 8 << 20), "RPC1": (1, 1 << 20)}


def test_plan_split_fit_matches_llama_cpp_buffers(tiny_model_dir, tiny_f32_dir, workers):
    """--plan --rpc's per-device weight bytes agree with the buffers llama.cpp allocated on each worker."""
    from convert.shapes import model_shapes
    from quant.estimate import estimate
    from quant.split_fit import split_fit

    e = estimate(model_shapes(tiny_model_dir), "f32", "f32", n_ctx=256, kv_type="f16")
    fits = split_fit(e, [("local", 1 << 40), ("w1", 1 << 40), ("w2", 1 << 40)], shares=SPLIT)
    assert [f.layers for f in fits] == [1, 2, 2]
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=256, rpc_servers=[str(w) for w in workers],
                             tensor_split=SPLIT) as chat:
        placed = chat.engine.device_weights
        names = [d.name for d in chat.engine.placement.workers]
    for fit, name in zip(fits[1:], names):
        # llama.cpp logs MiB with 2 decimals and pads each tensor to the buffer alignment (32 bytes)
        assert abs(placed[name][1] - fit.weight_bytes) <= 0.01 * (1 << 20) + 32 * 16, (name, placed[name], fit)


# ------------------------------------------------------------ the CLIs


def test_edge_chat_rpc_answers_like_local(tiny_f32_dir, workers):
    from edge_runtime.cli.cli import main as chat_main

    args = [str(tiny_f32_dir), "--max-tokens", "6", "--temperature", "0", "--ctx-size", "512", TEXT_Q]
    local = CliRunner().invoke(chat_main, args, catch_exceptions=False)
    split = CliRunner().invoke(chat_main, ["--rpc", ",".join(map(str, workers)), "--tensor-split", "1,2,2", *args],
                               catch_exceptions=False)
    assert local.exit_code == 0 and split.exit_code == 0, split.output
    assert split.stdout == local.stdout and local.stdout.strip()


def test_edge_chat_and_serve_name_a_wrong_worker(tiny_f32_dir):
    from edge_runtime.cli.cli import main as chat_main
    from edge_runtime.server.cli import main as serve_main

    bad = f"127.0.0.1:{free_port()}"
    chat = CliRunner().invoke(chat_main, [str(tiny_f32_dir), "--rpc", bad, "hi"])
    assert chat.exit_code != 0 and bad in chat.output and "cannot connect" in chat.output
    serve = CliRunner().invoke(serve_main, [str(tiny_f32_dir), "--rpc", bad, "--port", str(free_port())])
    assert serve.exit_code == 2 and bad in serve.output
    malformed = CliRunner().invoke(chat_main, [str(tiny_f32_dir), "--rpc", "nohostport", "hi"])
    assert malformed.exit_code == 2 and "HOST:PORT" in malformed.output


def test_edge_convert_plan_asks_the_workers(tiny_model_dir, workers):
    from edge_app.cli import main as convert_main

    result = CliRunner().invoke(convert_main, [str(tiny_model_dir), "--plan", "--quant", "f32", "--ctx-size", "256",
                                               "--rpc", ",".join(map(str, workers)), "--tensor-split", "1,2,2"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if " layers  weights " in line]  # the split table's rows
    assert [int(r.split()[2]) for r in rows] == [1, 2, 2]  # the layer table at the top of this file
    assert all(r.rstrip().endswith("fits") for r in rows)
    assert f"RPC {workers[1]}" in rows[2]


def test_setup_builds_its_own_rpc_wheel_keyed_by_flags():
    """pip's wheel cache ignores CMAKE_ARGS: set-up must build with --no-cache-dir into a folder named for the flags."""
    from support.rpc import REPO

    def dry_run(*extra: str) -> str:
        out = subprocess.run(["make", "-n", "llama-wheel", *extra], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout

    plain, cuda = dry_run(), dry_run("CMAKE_ARGS=-DGGML_CUDA=on")
    assert "--no-cache-dir" in plain and "CMAKE_ARGS='-DGGML_RPC=on" in plain
    assert "wheels/GGML_RPC=on'" in plain
    assert "wheels/GGML_RPC=on_GGML_CUDA=on'" in cuda and "-DGGML_RPC=on -DGGML_CUDA=on" in cuda


def test_worker_stops_cleanly_on_sigint():
    worker = Worker()
    code, out, err = worker.stop(signal.SIGINT)
    assert code == 0 and "stopping (SIGINT)" in out, err
    assert "Traceback" not in err
