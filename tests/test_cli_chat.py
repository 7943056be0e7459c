"""`edge-chat` through click's CliRunner, on the tiny converted model."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edge_runtime.cli.cli import main

FAST = ["--max-tokens", "4", "--temperature", "0", "--ctx-size", "1024"]


@pytest.fixture(scope="module")
def image_path(tmp_path_factory, test_image):
    path = tmp_path_factory.mktemp("cli") / "picture.png"
    test_image.save(path)
    return path


def run(args, stdin=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=stdin, catch_exceptions=False)


def test_one_shot_answer_streams_to_stdout(tiny_f32_dir, image_path):
    result = run([tiny_f32_dir, "--image", image_path, *FAST, "--stats", "What is in this picture?"])
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n") and len(result.stdout.strip()) > 0
    assert "TTFT" in result.stderr and "image" in result.stderr


def test_text_gguf_with_explicit_mmproj(tiny_f32_dir, image_path):
    m = json.loads((tiny_f32_dir / "manifest.json").read_text())
    text, mmproj = tiny_f32_dir / m["text"]["path"], tiny_f32_dir / m["mmproj"]["path"]
    result = run([text, "--mmproj", mmproj, "--image", image_path, *FAST, "Describe it."])
    assert result.exit_code == 0, result.output
    result = run([text, "--image", image_path, *FAST, "Describe it."])
    assert result.exit_code == 2 and "without a projector" in result.stderr


def test_load_flags_reach_the_engine(tiny_f32_dir, image_path, caplog):
    """The flags edge-chat shares with edge-serve and edge-bench: llama.cpp's spelling."""
    args = [tiny_f32_dir, "--image", image_path, *FAST, "--no-mmap", "--no-repack", "--ubatch-size", "16"]
    with caplog.at_level("INFO", logger="edge_runtime"):
        result = run([*args, "Describe it."])
    assert result.exit_code == 0, result.output
    assert "n_batch=512/16, weights read, no extra buffer types (repack off)" in caplog.text  # the engine's load line
    result = run([tiny_f32_dir, "--ubatch-size", "0", "Describe it."])
    assert result.exit_code == 2 and "--ubatch-size" in result.stderr


def test_batch_size_flag_reaches_the_engine(tiny_f32_dir, caplog):
    """-b/--batch-size as llama.cpp and edge-serve spell it."""
    with caplog.at_level("INFO", logger="edge_runtime"):
        result = run([tiny_f32_dir, *FAST, "-b", "64", "-ub", "16", "Hello."])
    assert result.exit_code == 0, result.output
    assert "n_batch=64/16" in caplog.text
    result = run([tiny_f32_dir, "--batch-size", "0", "Hello."])
    assert result.exit_code == 2 and "--batch-size" in result.stderr


def test_interactive_session_commands(tiny_f32_dir, image_path, tmp_path):
    script = "\n".join(
        [
            f"/image {image_path}",
            f"/image {tmp_path / 'missing.png'}",
            "What is in this picture?",
            "/stats",
            "And the colours?",
            "/reset",
            "/stats",
            "/help",
            "Hello",
            "/quit",
            "never asked",
        ]
    ) + "\n"
    result = run([tiny_f32_dir, *FAST], stdin=script)
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "(vision)" in err and "/image PATH" in err
    assert "no such file" in err
    assert err.count("TTFT") >= 2 and "(new conversation)" in err
    assert "1 image(s)" in err
    assert len([line for line in result.stdout.splitlines() if line.strip()]) == 3


def test_errors_are_messages_not_tracebacks(tiny_f32_dir, tmp_path):
    result = run([tmp_path / "nowhere", "Hi"])
    assert result.exit_code == 2 and "not found" in result.stderr and "Traceback" not in result.output
    result = run([tiny_f32_dir, "--cache-type-k", "q9", "Hi"])
    assert result.exit_code == 2 and "unknown KV cache type" in result.stderr
    result = run([tiny_f32_dir, *FAST, "--image", tmp_path / "nope.png", "Hi"])
    assert result.exit_code == 2 and "nope.png" in result.stderr


def test_module_entry_point_runs(tiny_f32_dir, image_path):
    proc = subprocess.run(
        [sys.executable, "-m", "edge_runtime.cli.cli", str(tiny_f32_dir), "--image", str(image_path), *FAST, "Hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
