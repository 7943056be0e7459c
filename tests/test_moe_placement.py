"""MoE experts where they fit: llama.cpp's tensor buffer overrides (--cpu-moe, --n-cpu-moe, -ot), locally and
over two loopback RPC workers, with real edge-rpc-worker processes and the tiny random MoE.

Expected answers come from the same model run locally (llama.cpp alone); where the tensors went comes from
llama.cpp's own load log (its "buffer type overridden" lines and per-buffer sizes), and the expert bytes from
the GGUF's tensor table read with gguf-py.
"""
from __future__ import annotations

import re
import signal

import gguf
import pytest
from click.testing import CliRunner

from edge_llama.errors import LoadOptionError
from edge_llama.experts import LayerBytes, fit_n_cpu_moe, parse_overrides
from edge_runtime import VisionChat
from support.rpc import Worker
from test_moe import HUB
from test_quant_support import pair_of

GREEDY = {"temperature": 0.0, "max_tokens": 12}
TEXT_Q = "Describe a red bicycle in one sentence."
IMAGE_Q = "What is in this picture?"
# 4 blocks + the output layer: block 0 here, blocks 1-2 on the first worker, block 3 on the second
SPLIT = (1.0, 2.0, 2.0)
OVERRIDDEN = re.compile(r"tensor (blk\.(\d+)\.\S+) \(.*buffer type overridden to (\S+)")
BUFFER = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB")


@pytest.fixture(scope="module")
def moe_dir(artifacts):
    return artifacts.converted(HUB, "f32")


@pytest.fixture(scope="module")
def workers():
    pair = [Worker(), Worker()]
    yield pair
    for w in pair:
        w.stop(signal.SIGTERM)


def expert_bytes(model_dir) -> dict[int, int]:
    """Expert bytes per block, from the file's tensor table."""
    out: dict[int, int] = {}
    for t in gguf.GGUFReader(pair_of(model_dir)[0]).tensors:
        if "_exps." in t.name:
            block = int(t.name.split(".")[1])
            out[block] = out.get(block, 0) + int(t.n_bytes)
    return out


def answers(chat: VisionChat, image) -> list[str]:
    out = [chat.ask(TEXT_Q, **GREEDY)]
    chat.reset()
    out.append(chat.ask(IMAGE_Q, images=[image], **GREEDY))
    return out


def load_log(chat: VisionChat) -> tuple[dict[str, str], dict[str, float]]:
    """llama.cpp's word on the load: {tensor: buffer type it was overridden to}, {buffer: MiB}."""
    lines = chat.engine.text_model.load_log
    moved = {m[1]: m[3] for line in lines if (m := OVERRIDDEN.search(line))}
    sizes = {m[1]: float(m[2]) for line in lines if (m := BUFFER.search(line))}
    return moved, sizes


def test_experts_on_the_host_answer_as_the_split_and_the_local_run(moe_dir, test_image, workers):
    """The must-show: local, split over two workers, and split with every expert kept in host RAM
    (--cpu-moe) give the same greedy tokens; llama.cpp's log shows every expert tensor in the CPU buffer
    and the workers' buffers smaller by exactly their blocks' experts."""
    rpc = {"rpc_servers": [str(w) for w in workers], "tensor_split": SPLIT}
    with VisionChat.from_dir(moe_dir, n_ctx=1024) as local:
        expected = answers(local, test_image)
        assert "no GPU or RPC device" in local.engine.experts_how  # CPU only: auto has nothing to move
        assert local.engine.n_cpu_moe == 0
    with VisionChat.from_dir(moe_dir, n_ctx=1024, **rpc) as split:
        plain = answers(split, test_image)
        plain_moved, plain_sizes = load_log(split)
        assert split.engine.n_cpu_moe == 0 and "auto: all fit" in split.engine.experts_how
    with VisionChat.from_dir(moe_dir, n_ctx=1024, n_cpu_moe="all", **rpc) as on_host:
        hosted = answers(on_host, test_image)
        moved, sizes = load_log(on_host)
        workers_of = on_host.engine.placement.buffer_devices()
    assert expected == plain == hosted and all(expected)
    experts = expert_bytes(moe_dir)
    assert {name for name, buft in moved.items() if "_exps." in name and buft == "CPU"} == {
        f"blk.{b}.ffn_{p}_exps.weight" for b in experts for p in ("gate", "up", "down")}
    assert not any("_exps." in name for name in plain_moved)
    mib = 1 << 20
    # the host's CPU buffer grew by the experts of the three worker blocks (block 0 was here already) ...
    assert sizes["CPU"] - plain_sizes["CPU"] == pytest.approx((experts[1] + experts[2] + experts[3]) / mib, abs=0.02)
    # ... and each worker's buffer shrank by its blocks' experts (1-2 on the first, 3 on the second)
    by_worker = {workers_of[name]: plain_sizes[name] - sizes[name] for name in workers_of}
    assert sorted(by_worker.values()) == pytest.approx(sorted([experts[3] / mib, (experts[1] + experts[2]) / mib]),
                                                       abs=0.02)


def test_n_cpu_moe_keeps_the_first_blocks_experts_only(moe_dir, workers):
    """--n-cpu-moe 2: llama.cpp overrides exactly blocks 0-1's three expert tensors; the answer is unchanged."""
    rpc = {"rpc_servers": [str(w) for w in workers], "tensor_split": SPLIT}
    with VisionChat.from_dir(moe_dir, n_ctx=512, **rpc) as split:
        expected = split.ask(TEXT_Q, **GREEDY)
    with VisionChat.from_dir(moe_dir, n_ctx=512, n_cpu_moe=2, **rpc) as chat:
        got = chat.ask(TEXT_Q, **GREEDY)
        moved, _ = load_log(chat)
        assert chat.engine.n_cpu_moe == 2 and "blocks 0-1" in chat.engine.experts_how
    assert got == expected
    assert sorted(n for n in moved if "_exps." in n) == sorted(
        f"blk.{b}.ffn_{p}_exps.weight" for b in (0, 1) for p in ("gate", "up", "down"))


def test_override_tensor_names_llama_cpps_buffer_types(moe_dir, workers):
    """-ot as llama.cpp spells it: exps=CPU is --cpu-moe; an RPC buffer type by its name works; an unknown
    buffer type is refused naming the ones there are."""
    rpc = {"rpc_servers": [str(w) for w in workers], "tensor_split": SPLIT}
    with VisionChat.from_dir(moe_dir, n_ctx=512, override_tensor="exps=CPU", **rpc) as chat:
        moved, _ = load_log(chat)
        assert "--override-tensor" in chat.engine.experts_how
    assert len([n for n, buft in moved.items() if "_exps." in n and buft == "CPU"]) == 3 * 4
    first = f"RPC0[{workers[0]}]"
    with VisionChat.from_dir(moe_dir, n_ctx=512, override_tensor=[rf"blk\.3\.ffn_up_exps={first}"], **rpc) as chat:
        moved, _ = load_log(chat)
    assert moved == {"blk.3.ffn_up_exps.weight": first} | {k: v for k, v in moved.items() if not k.startswith("blk.")}
    with pytest.raises(LoadOptionError, match=r"no buffer type 'NOPE'.*available: .*CPU"):
        VisionChat.from_dir(moe_dir, n_ctx=512, override_tensor="exps=NOPE", **rpc)


@pytest.mark.parametrize("text, message", [("exps", "no '='"), ("=CPU", "PATTERN=BUFFER_TYPE"),
                                           ("exps(=CPU", "not a regular expression")])
def test_bad_override_is_refused_at_the_door(moe_dir, text, message):
    with pytest.raises(LoadOptionError, match=message):
        parse_overrides(text)
    with pytest.raises(ValueError, match=message):
        VisionChat.from_dir(moe_dir, override_tensor=text)


def test_n_cpu_moe_on_a_dense_model_or_a_bad_value(tiny_f32_dir):
    with VisionChat.from_dir(tiny_f32_dir, n_ctx=256, n_cpu_moe="all") as chat:
        assert chat.engine.experts_how == "no experts (dense model)"
    with pytest.raises(ValueError, match="n_cpu_moe must be 'auto', 'all' or a number of blocks"):
        VisionChat.from_dir(tiny_f32_dir, n_cpu_moe=-1)


def test_fit_keeps_the_fewest_leading_blocks_on_the_host():
    """By hand: 4 blocks of 10 MB experts + 2 MB rest, blocks 2-3 on device 1 (free 20 MB, 4 MB reserved)."""
    sizes = LayerBytes(experts=(10, 10, 10, 10), rest=(2, 2, 2, 2), outside=5)
    owners = [0, 0, 1, 1, 1]  # the output layer is a fifth unit, not counted here
    assert fit_n_cpu_moe(sizes, owners, free=[40], reserve=[4]) == 0  # 24 + 4 fits
    assert fit_n_cpu_moe(sizes, owners, free=[20], reserve=[4]) == 3  # block 3's experts alone: 14 + 4 fits
    assert fit_n_cpu_moe(sizes, owners, free=[9], reserve=[4]) == 4  # only the rest: 4 + 4
    assert fit_n_cpu_moe(sizes, owners, free=[7], reserve=[4]) is None


# ------------------------------------------------------------ the CLIs


def test_edge_chat_cpu_moe_over_rpc_answers_like_local(moe_dir, workers):
    from edge_runtime.cli.cli import main as chat_main

    args = [str(moe_dir), "--max-tokens", "6", "--temperature", "0", "--ctx-size", "512", TEXT_Q]
    local = CliRunner().invoke(chat_main, args, catch_exceptions=False)
    hosted = CliRunner().invoke(chat_main, ["--rpc", ",".join(map(str, workers)), "--tensor-split", "1,2,2",
                                            "--cpu-moe", *args], catch_exceptions=False)
    assert local.exit_code == 0 and hosted.exit_code == 0, hosted.output
    assert hosted.stdout == local.stdout and local.stdout.strip()
    both = CliRunner().invoke(chat_main, ["--cpu-moe", "--n-cpu-moe", "2", *args])
    assert both.exit_code == 2 and "give one" in both.output


def test_edge_serve_and_bench_take_the_flags(moe_dir):
    from edge_bench.cli import main as bench_main
    from edge_runtime.server.cli import main as serve_main
    from support.server import free_port

    bad = CliRunner().invoke(serve_main, [str(moe_dir), "-ot", "exps", "--port", str(free_port())])
    assert bad.exit_code == 2 and "no '='" in bad.output
    helped = CliRunner().invoke(bench_main, ["--help"])
    assert all(flag in helped.output for flag in ("--cpu-moe", "--n-cpu-moe", "--override-tensor"))


@pytest.mark.torch  # the Hugging Face MoE checkpoint --plan reads is built with torch
def test_edge_convert_plan_rpc_experts_match_llama_cpps_buffers(artifacts, moe_dir, workers):
    """--plan --rpc --n-cpu-moe 2: each worker's weights equal the buffer llama.cpp allocated on it."""
    from edge_app.cli import main as convert_main

    result = CliRunner().invoke(convert_main, [str(artifacts.model(HUB)), "--plan", "--quant", "f32", "--ctx-size",
                                               "512", "--rpc", ",".join(map(str, workers)), "--tensor-split",
                                               "1,2,2", "--n-cpu-moe", "2"])
    assert result.exit_code == 0, result.output
    assert "MoE experts of blocks 0-1 on the local machine" in result.output
    rows = [line for line in result.output.splitlines() if " layers  weights " in line]
    planned = [float(r.split("weights")[1].split("MB")[0].replace(",", "")) for r in rows]
    with VisionChat.from_dir(moe_dir, n_ctx=512, n_cpu_moe=2, rpc_servers=[str(w) for w in workers],
                             tensor_split=SPLIT) as chat:
        _, sizes = load_log(chat)
    for worker, mb in zip(workers, planned[1:]):
        assert sizes[f"RPC0[{worker}]"] * (1 << 20) / 1e6 == pytest.approx(mb, abs=0.05), (worker, rows)
    auto = CliRunner().invoke(convert_main, [str(artifacts.model(HUB)), "--plan", "--quant", "f32", "--ctx-size",
                                             "512", "--rpc", ",".join(map(str, workers))])
    assert auto.exit_code == 0 and "MoE experts beside their layers" in auto.output  # plenty of room on loopback


# ------------------------------------------------------------ edge-bench's transformers party


@pytest.mark.torch
def test_edge_bench_transformers_party_runs_the_moe_class(artifacts):
    """The transformers baseline loads an MoE checkpoint with transformers' MoE class (through the family
    registry) and times its greedy tokens."""
    from edge_bench.options import TRANSFORMERS, Config, Measure, Resolution
    from edge_bench.workers import WorkerSpec, run_worker

    spec = WorkerSpec(TRANSFORMERS, Config("f16", "f16", "f16", Resolution(64, 64)),
                      Measure(n_ctx=256, threads=1, prompt_lengths=(8,), decode_tokens=4, warmup=0, repeats=1),
                      hf_dir=str(artifacts.model(HUB)))
    result = run_worker(spec, timeout_s=600)
    assert result.ok, result.error
    assert any(n.startswith("Qwen3VLMoeForConditionalGeneration,") for n in result.notes), result.notes
    assert result.values["decode_tokens"] == 4 and result.samples["decode_tok_s"][0] > 0
