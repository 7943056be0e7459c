"""Engine: KV-prefix reuse across text and images, the encoder cache, KV-cache types.

Real llama.cpp on the tiny converted model; logits are compared against a fresh
evaluation, which checks M-RoPE positions after images as well as token reuse.
"""
from __future__ import annotations

import json
import threading

import gguf
import numpy as np
import pytest

from edge_llama import FLASH_ATTN_ON

from edge_models.qwen3vl.synthetic import SyntheticSpec, TextShape
from edge_llama import CPU_UBATCH
from edge_runtime.core.detokenize import PieceTable
from edge_runtime.core.step import Answer, Core
from edge_runtime.core.engine import Engine
from edge_runtime.core.generation import AnswerStep, StopReason
from edge_runtime.errors import ContextOverflowError, EngineClosedError, ModelFileError
from edge_runtime.vision.images import image_digest, to_rgb_array
from edge_runtime.core.options import EngineOptions, GenerationOptions
from edge_runtime.vision.image_input import ImageInput
from edge_runtime.core.sampling import build_sampler

GREEDY = GenerationOptions(temperature=0.0)
# Quantized KV blocks hold 32 values: the head size must be a multiple (the tiny model's is 16).
HEAD32 = SyntheticSpec(text=TextShape(head_dim=32, mrope_section=(4, 6, 6)))


def pair(out_dir):
    m = json.loads((out_dir / "manifest.json").read_text())
    return out_dir / m["text"]["path"], out_dir / m["mmproj"]["path"]


def turn(marker: str, question: str, n_images: int = 1) -> str:
    return f"<|im_start|>user\n{marker * n_images}{question}<|im_end|>\n<|im_start|>assistant\n"


def last_logits(engine: Engine) -> np.ndarray:
    return engine.context.logits(-1)


def answer(engine: Engine, seq_id: int = 0, n: int = 6) -> list[int]:
    """Up to `n` greedy tokens after a prefill, through the batched core's step (one sequence)."""
    with Core(engine, 1) as core:
        ans = Answer(seq_id, build_sampler(GREEDY, engine.text_model, 0),
                     AnswerStep(PieceTable(engine.text_model), GREEDY, n, False, engine.is_end_of_turn))
        try:
            core.start(ans)
            while not ans.done:
                core.step([ans])
        finally:
            ans.close()
        return ans.tokens


@pytest.fixture(scope="module")
def image(test_image) -> ImageInput:
    return ImageInput.from_array(to_rgb_array(test_image), image_digest(test_image))


@pytest.fixture(scope="module")
def engine(tiny_f32_dir):
    text, mmproj = pair(tiny_f32_dir)
    with Engine(text, mmproj, EngineOptions(n_ctx=1024, n_seq_max=2)) as e:
        yield e


@pytest.fixture()
def fresh(engine):
    for seq in (0, 1):
        engine.reset(seq)
    engine.encoder_cache.clear()
    return engine


def prefill_text(engine, text, images=(), seq_id=0, reserve=8):
    with engine.tokenize(text, images) as prompt:
        return engine.prefill(prompt, seq_id, reserve=reserve), prompt.n_tokens


def test_follow_up_reuses_kv_and_matches_fresh_logits(fresh, image):
    e = fresh
    first = turn(e.marker, "Describe the picture.")
    r1, n1 = prefill_text(e, first, [image])
    assert r1.reused_tokens == 0 and r1.images_encoded == 1 and r1.image_tokens > 0
    reply = answer(e)
    # the next turn: the answer as the template would render it, then a new question
    pieces = PieceTable(e.text_model)
    text_reply = b"".join(pieces(t) for t in reply).decode("utf-8", "replace")
    follow = first + text_reply + "<|im_end|>\n" + "<|im_start|>user\nWhat colour is it?<|im_end|>\n<|im_start|>assistant\n"
    r2, n2 = prefill_text(e, follow, [image])
    assert r2.reused_tokens >= n1 - 1  # the generation prompt's last token is re-evaluated at most
    assert r2.images_encoded == 0 and r2.image_encode_s == 0.0
    assert r2.evaluated_tokens == n2 - r2.reused_tokens
    reused = last_logits(e)

    e.reset(0)
    r3, _ = prefill_text(e, follow, [image])
    assert r3.reused_tokens == 0
    np.testing.assert_allclose(reused, last_logits(e), rtol=0, atol=2e-3)


def test_divergence_after_image_keeps_image_in_kv(fresh, image):
    e = fresh
    prefill_text(e, turn(e.marker, "What is this?"), [image])
    state_after_first = e.seq_state(0)
    image_end = next(i for i, u in enumerate(state_after_first.units) if u.is_image) + 1
    kept_tokens = sum(u.n_tokens for u in state_after_first.units[:image_end])
    r, _ = prefill_text(e, turn(e.marker, "How many circles are there?"), [image])
    assert r.reused_tokens >= kept_tokens, "the prefix through the image must stay in the KV cache"
    assert r.images_encoded == 0 and r.encoder_cache_hits == 0
    reused = last_logits(e)
    e.reset(0)
    prefill_text(e, turn(e.marker, "How many circles are there?"), [image])
    np.testing.assert_allclose(reused, last_logits(e), rtol=0, atol=2e-3)


def test_divergence_before_image_replays_cached_embeddings(fresh, image):
    e = fresh
    prefill_text(e, "<|im_start|>system\nBe brief.<|im_end|>\n" + turn(e.marker, "What is this?"), [image])
    r, _ = prefill_text(e, "<|im_start|>system\nBe careful.<|im_end|>\n" + turn(e.marker, "What is this?"), [image])
    assert r.images_encoded == 0 and r.encoder_cache_hits == 1 and r.image_encode_s == 0.0
    assert 0 < r.reused_tokens < r.prompt_tokens - r.image_tokens
    replayed = last_logits(e)
    e.reset(0)
    e.encoder_cache.clear()
    r2, _ = prefill_text(e, "<|im_start|>system\nBe careful.<|im_end|>\n" + turn(e.marker, "What is this?"), [image])
    assert r2.images_encoded == 1
    np.testing.assert_allclose(replayed, last_logits(e), rtol=0, atol=2e-3)


def test_encoder_cache_serves_another_sequence(fresh, image):
    e = fresh
    text = turn(e.marker, "What is this?")
    r0, _ = prefill_text(e, text, [image], seq_id=0)
    logits0 = last_logits(e)
    r1, _ = prefill_text(e, text, [image], seq_id=1)
    assert r0.images_encoded == 1
    assert r1.images_encoded == 0 and r1.encoder_cache_hits == 1 and r1.reused_tokens == 0
    np.testing.assert_allclose(logits0, last_logits(e), rtol=0, atol=2e-3)
    assert answer(e, 0) == answer(e, 1)


def test_mtmd_context_is_used_by_one_thread_at_a_time(fresh, image):
    """The server's vision thread encodes while a conversation save tokenizes and prefills
    on the scheduler thread: both go through `mtmd_lock`, so the second waits for the first."""
    e = fresh
    text = turn(e.marker, "What is this?")
    done = threading.Event()
    result: list = []

    def save_like() -> None:
        result.append(prefill_text(e, text, [image]))
        done.set()

    with e.mtmd_lock:  # another thread is using the mtmd context
        worker = threading.Thread(target=save_like)
        worker.start()
        assert not done.wait(0.5), "tokenize/encode ran while another thread held the mtmd context"
    assert done.wait(60)
    worker.join()
    assert result[0][0].images_encoded == 1


def test_two_images_and_positions_track_mrope(fresh, image, test_image):
    e = fresh
    other = test_image.rotate(180)
    img2 = ImageInput.from_array(to_rgb_array(other), image_digest(other))
    with e.tokenize(turn(e.marker, "Compare them.", 2).replace(e.marker * 2, e.marker + " and " + e.marker), [image, img2]) as p:
        e.prefill(p, 0, reserve=4)
        state = e.seq_state(0)
        assert state.n_tokens == p.n_tokens
        assert state.n_pos == sum(c.n_pos for c in p.chunks)
        assert state.n_pos < state.n_tokens, "M-RoPE: an image advances the position by its grid side, not its tokens"
        assert e.context.seq_pos_range(0)[1] < state.n_pos


def test_overflow_leaves_sequence_untouched(fresh, image):
    e = fresh
    prefill_text(e, turn(e.marker, "What is this?"), [image])
    before = list(e.seq_state(0).units)
    with e.tokenize(turn(e.marker, "And now?"), [image]) as p:
        with pytest.raises(ContextOverflowError, match=r"n_ctx=1024.*max_tokens|max_tokens=2000"):
            e.prefill(p, 0, reserve=2000)
    assert e.seq_state(0).units == before


def test_kv_used_bytes_matches_llama_state_size(fresh):
    e = fresh
    prefill_text(e, turn("", "Count to ten please, slowly and carefully."), [])
    answer(e, n=10)
    used = e.kv_used_bytes(0)
    state = e.context.seq_state_size(0)
    assert used > 0 and used <= state <= used * 1.25, (used, state)
    meta = {f.name: f.contents() for f in gguf.GGUFReader(e.model_path).fields.values() if f.name.startswith("qwen3vl.")}
    k_row = meta["qwen3vl.attention.head_count_kv"] * meta["qwen3vl.attention.key_length"]
    v_row = meta["qwen3vl.attention.head_count_kv"] * meta["qwen3vl.attention.value_length"]
    assert e.kv_cache_bytes == meta["qwen3vl.block_count"] * (k_row + v_row) * 2 * e.n_ctx  # f16: 2 bytes a value


@pytest.mark.parametrize("kv,ratio", [("q8_0", 34 / 64), ("q4_0", 18 / 64)])
def test_quantized_kv_cache_size_and_output(artifacts, image, kv, ratio):
    text, mmproj = pair(artifacts.converted(HEAD32, "f32"))
    sizes = {}
    for kind in ("f16", kv):
        with Engine(text, mmproj, EngineOptions(n_ctx=512, kv_cache_type_k=kind, kv_cache_type_v=kind)) as e:
            sizes[kind] = e.kv_cache_bytes
            if kind == kv:
                assert e.flash_attn_type == FLASH_ATTN_ON
                prefill_text(e, turn(e.marker, "What is this?"), [image])
                assert len(answer(e, n=4)) > 0
                state = e.context.seq_state_size(0)
                assert e.kv_used_bytes(0) <= state <= e.kv_used_bytes(0) * 1.25
    assert sizes[kv] / sizes["f16"] == pytest.approx(ratio, abs=0.01)


def test_decode_outcome_and_early_close_keep_kv_consistent(fresh):
    e = fresh
    prefill_text(e, turn("", "Say something."), [], reserve=20)
    n_before = e.seq_state(0).n_tokens
    with Core(e, 1) as core:
        ans = Answer(0, build_sampler(GREEDY, e.text_model, 0),
                     AnswerStep(PieceTable(e.text_model), GREEDY, 20, False, e.is_end_of_turn))
        core.start(ans)
        core.step([ans])
        core.step([ans])
        ans.cancel()  # the caller stops reading
        ans.close()
    assert len(ans.tokens) == 3 and ans.stats.generated_tokens == 3 and ans.pending is None
    assert ans.stats.stop_reason == StopReason.CANCELLED
    # the third token was sampled but never evaluated
    assert e.seq_state(0).n_tokens == n_before + 2
    pos_max = e.context.seq_pos_range(0)[1]
    assert pos_max == e.seq_state(0).n_pos - 1


def test_missing_files_and_closed_engine(tiny_f32_dir, tmp_path):
    text, mmproj = pair(tiny_f32_dir)
    with pytest.raises(ModelFileError, match="text model GGUF not found"):
        Engine(tmp_path / "nope.gguf")
    with pytest.raises(ModelFileError, match="projector GGUF not found"):
        Engine(text, tmp_path / "nope-mmproj.gguf")
    e = Engine(text, None, EngineOptions(n_ctx=64))
    assert not e.has_vision and e.chat_template
    e.close()
    e.close()
    with pytest.raises(EngineClosedError):
        e.tokenize("hello")


@pytest.mark.parametrize("load", [
    {"mmap": True, "n_ubatch": 512},
    {"mmap": False, "n_ubatch": 8},  # an image spans many ubatches
    {"repack": False, "encoder_cache_mb": 0},  # embeddings used straight from mtmd's buffer
])
def test_load_settings_change_memory_not_answers(tiny_f32_dir, fresh, image, load):
    question = turn(fresh.marker, "What is this?")
    prefill_text(fresh, question, [image])
    expected, expected_answer = last_logits(fresh), answer(fresh)
    text, mmproj = pair(tiny_f32_dir)
    with Engine(text, mmproj, EngineOptions(n_ctx=1024, **load)) as e:
        assert e.mmap is load.get("mmap", True)  # "auto" maps the file when nothing is repacked
        cpu_default = CPU_UBATCH if e.n_gpu_layers == 0 else e.n_batch
        assert e.n_ubatch == min(load.get("n_ubatch", cpu_default), e.n_batch)
        for _ in range(2):  # the second prompt encodes again when the cache is off
            e.reset(0)
            r, _ = prefill_text(e, question, [image])
            np.testing.assert_allclose(last_logits(e), expected, rtol=0, atol=2e-3)
        assert r.images_encoded == (1 if load.get("encoder_cache_mb") == 0 else 0)
        assert answer(e) == expected_answer


def test_answer_step_ends_on_end_of_turn_stop_string_and_limit(engine):
    """The per-token step VisionChat and the server share: end-of-turn ends unshown and uncounted,
    a stop string ends with the text before it, the limit ends after `limit` tokens."""
    from edge_runtime.core.generation import END_OF_TURN, LENGTH, STOP, AnswerStep

    words = engine.text_model.tokenize("red green blue", add_special=False)
    im_end = engine.text_model.tokenize("<|im_end|>", add_special=False)
    assert len(im_end) == 1 and len(words) >= 3

    def run(options, limit, tokens):
        step = AnswerStep(PieceTable(engine.text_model), options, limit, False, engine.is_end_of_turn)
        shown = []
        for t in tokens:
            shown.append(step.accept(t))
            if step.reason is not None:
                break
        return "".join(shown) + step.finish(), step.reason, step.generated

    assert run(GREEDY, 100, words + im_end) == ("red green blue", END_OF_TURN, len(words))
    text, reason, n = run(GenerationOptions(stop=("green",)), 100, words + im_end)
    assert (text.strip(), reason) == ("red", STOP) and n < len(words) + 1
    assert run(GREEDY, 2, words + im_end)[1:] == (LENGTH, 2)


def test_a_step_picks_each_greedy_answer_as_llama_cpps_greedy_sampler_would(tiny_f32_dir):
    """The core picks greedy answers' tokens with one argmax over the step's logits block; llama.cpp's
    own greedy sampler, run afterwards on each row as the core left it (bias added), picks the same,
    a biased row and a seeded sampling answer beside them included; on a tie both take the lower id."""
    from edge_llama import Sampler

    text, mmproj = pair(tiny_f32_dir)
    with Engine(text, mmproj, EngineOptions(n_ctx=1024, n_seq_max=3)) as e, Core(e, 3) as core:
        model = e.text_model
        answers = []
        for seq, (question, options) in enumerate([("Say something.", GREEDY), ("Count to ten.", GREEDY),
                                                   ("Name a color.", GenerationOptions(temperature=0.9))]):
            prefill_text(e, turn("", question), [], seq_id=seq, reserve=8)
            ans = Answer(seq, build_sampler(options, model, 7),
                         AnswerStep(PieceTable(model), options, 8, False, e.is_end_of_turn))
            core.start(ans)
            answers.append(ans)
        forced = model.tokenize("blue", add_special=False)[0]
        answers[1].bias = {t: -np.inf for t in range(model.n_vocab) if t != forced}  # logit_bias leaves one
        core.step(answers)
        for i in range(2):
            with Sampler(model) as greedy:
                assert answers[i].tokens[-1] == greedy.greedy().sample(e.context, i)
        assert answers[1].tokens[-1] == forced

        prefill_text(e, turn("", "One more."), [], seq_id=0, reserve=8)
        tie = e.logits_row(-1)
        tie[:] = 0.0
        tie[[9, 5, 12]] = 1.0  # three tokens share the highest logit
        ans = Answer(0, build_sampler(GREEDY, model, 0), AnswerStep(PieceTable(model), GREEDY, 8, False,
                                                                     e.is_end_of_turn))
        core.start(ans)
        with Sampler(model) as greedy:
            assert ans.tokens == [greedy.greedy().sample(e.context, -1)] == [5]
        for a in answers + [ans]:
            a.close()
