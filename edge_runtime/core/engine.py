"""The engine: a loaded model pair serving prompts on its KV-cache sequences, with KV reuse.

One `Engine` owns a llama model, one llama context (its KV cache holds up to
`n_seq_max` sequences) and, for vision models, an mtmd context (`core/loading.py`).
For each sequence it remembers which units (text tokens, images by content hash) are
in the KV cache (`core/sequences.py`), so `prefill` evaluates only what follows the
longest common prefix. Encoder outputs are kept in memory and on disk
(`core/encoder_path.py`) so another conversation about the same image skips the vision
encoder; each encode and prefill teaches the device cost model (`core/image_costs.py`).

Each operation exists once and both clients use it: `eval_tokens` (tokens of
one or many sequences in one decode), `eval_image_piece` (a slice of an image's
embeddings), `encode_chunk` (the vision encoder, feeding both caches), `sample`;
the bookkeeping of every sequence is kept by them alone. `prefill` takes a
prompt's pieces one after the other (VisionChat); the server's scheduler takes
one a step between the other slots' tokens, through `core.Core`.

The engine is not thread-safe; callers serialise access (VisionChat holds a lock).
"""
from __future__ import annotations

import logging

import time
from typing import Any, Callable, Sequence

import numpy as np

from edge_llama import Batch, EmbeddingBatch, LlamaError, Sampler, image_grid, image_positions

from edge_runtime.core.encoder_path import EncoderPath
from edge_runtime.core.image_costs import ImageCosts, calibration_image
from edge_runtime.core.kv_state import SeqState, StateFingerprint, Unit, image_unit, plan_reuse, text_units
from edge_runtime.core.loading import LoadedModel
from edge_runtime.core.prompt import Chunk, Piece, Prompt, PromptCursor, tokenize_multimodal, tokenize_text
from edge_runtime.core.sequences import Sequences, fingerprint
from edge_runtime.core.stats import GenerationStats
from edge_runtime.errors import ContextOverflowError, DecodeError, VisionUnsupportedError
from edge_runtime.vision.disk_cache import DiskEncoderCache
from edge_runtime.vision.encoder_cache import EncoderCache
from edge_runtime.vision.image_budget import DeviceCost, ImagePlan, Planner
from edge_runtime.vision.image_input import ImageInput


log = logging.getLogger(__name__)


class Engine(LoadedModel):
    """A text GGUF and its projector loaded once, serving any number of prompts on its sequences.

    `VisionChat` and edge-serve build on it; use it directly only for what they do not offer.
    It remembers what each KV-cache sequence holds, so a prompt sharing a prefix with the last
    one evaluates only what is new.
    """

    def _load(self) -> None:
        super()._load()
        assert self._lmodel is not None
        self._costs: ImageCosts | None = None
        if self.mmproj_path is not None:
            self._costs = ImageCosts(self.options, self.model_path, self.mmproj_path, self.vision, self._lmodel,
                                     self.threads, self.projector_gpu, self.n_gpu_layers)
        self.sequences = Sequences(lambda: self.context, self.options.n_seq_max, self.n_ctx, self.kv_token_bytes)
        self.encoder = EncoderPath(self.options, self.mmproj_path, lambda: self.projector, self.mtmd_lock,
                                   self.measured)
        if self._costs is not None and self._costs.needs_calibration:
            self.calibrate()

    # ------------------------------------------------------------ the parts' faces callers know

    @property
    def encoder_cache(self) -> EncoderCache:
        """Encoder outputs in memory (byte-bounded LRU), by image content hash."""
        return self.encoder.memory

    @property
    def disk_cache(self) -> DiskEncoderCache | None:
        """Encoder outputs on disk, keyed by projector and image (None: not configured)."""
        return self.encoder.disk

    @property
    def cost(self) -> DeviceCost:
        """This device's measured encoder and prefill speeds (vision models only)."""
        return self._vision_costs().cost

    @property
    def text_flops_per_token(self) -> float:
        """FLOPs of one prompt token through the text model, as the cost model counts them."""
        return self._vision_costs().text_flops_per_token

    @property
    def vision_free_bytes(self) -> int | None:
        """Memory free for the encoder's activations where it runs, which bounds an image's budget."""
        return self._vision_costs().vision_free_bytes

    def _vision_costs(self) -> ImageCosts:
        if self._costs is None:
            raise VisionUnsupportedError(f"{self.model_path.name} was loaded without a projector (mmproj)")
        return self._costs

    def planner(self) -> Planner:
        """This engine's image budgets as they stand (the cost model moves once, on the first measurement)."""
        return self._vision_costs().planner(self.n_ctx_seq)

    def plan_image(self, detail: str = "auto", share: int = 1, need: str = "") -> ImagePlan:
        """The token budget for one of `share` images of a message at `detail`, whose answer has `need`."""
        return self.planner().plan(detail, share, need)

    def measured(self, kind: str, tokens: int, seconds: float) -> None:
        """Feed the device cost model with one encode ("encoder") or prompt evaluation ("prefill") of
        `tokens`; the first of each kind is stored for later processes and for `edge-convert --plan`."""
        self._vision_costs().measured(kind, tokens, seconds)

    def calibrate(self) -> None:
        """Measure this device's encoder and prefill rates on a small image (32 tokens: a tenth of what a
        640x480 photo costs), through the path an ask takes, so the first image is planned from them;
        done at load where the cost cache has no entry for this model pair on this device."""
        costs = self._vision_costs()
        with costs.calibrating(), self.tokenize(self.marker + "\n", [calibration_image(self.vision)]) as prompt:
            try:
                self.prefill(prompt, seq_id=0)
            finally:
                self.reset(0)
        log.info("image cost model calibrated: encoder %.1f GFLOP/s, prefill %.1f GFLOP/s",
                 costs.cost.encoder_flops_s / 1e9, costs.cost.prefill_flops_s / 1e9)

    def truncate(self, seq_id: int, keep: int) -> None:
        """Keep the first `keep` units of sequence `seq_id` (cells past them, even half-written, go)."""
        self.sequences.truncate(seq_id, keep)

    def copy_sequence(self, src: int, dst: int) -> None:
        """Make sequence `dst` hold what `src` holds (n > 1 answers continue one evaluated prompt)."""
        self._require_open()
        self.sequences.copy(src, dst)

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes allocated for K and V (n_ctx cells)."""
        return self.sequences.kv_cache_bytes

    def kv_used_bytes(self, seq_id: int | None = None) -> int:
        """KV bytes holding one sequence (all of them with None): what a conversation costs in memory."""
        return self.sequences.kv_used_bytes(seq_id)

    def seq_state(self, seq_id: int = 0) -> SeqState:
        """What sequence `seq_id` holds (tokens and images), which decides what a new prompt reuses."""
        return self.sequences[seq_id]

    def reset(self, seq_id: int = 0) -> None:
        """Forget sequence `seq_id` (its KV cells are freed)."""
        self._require_open()
        self.sequences.reset(seq_id)

    def fingerprint(self, chat_template: str) -> StateFingerprint:
        """What this engine's KV cells depend on, with the source of the chat template that renders
        them (the model files are hashed once per process)."""
        self._require_open()
        return fingerprint(self.options, self.model_path, self.mmproj_path, self.arch, self.flash_attn_type,
                           chat_template)

    def export_seq(self, seq_id: int = 0) -> tuple[list[Unit], bytearray]:
        """The units `seq_id` holds and llama.cpp's serialised cells of it."""
        self._require_open()
        return self.sequences.export(seq_id)

    def import_seq(self, seq_id: int, units: Sequence[Unit], data: bytearray) -> None:
        """Put exported cells into `seq_id` and take `units` as its bookkeeping, so the
        next prefill reuses them. On refusal the sequence keeps what it held."""
        self._require_open()
        self.check_fits(sum(u.n_tokens for u in units), 0)
        self.sequences.import_(seq_id, units, data)

    def take_disk_hit(self, digest: str) -> bool:
        """Whether `digest`'s embeddings were last read from the disk cache (each read counted once)."""
        return self.encoder.take_disk_hit(digest)

    def encode_chunk(self, chunk: Chunk, keep: bool = False,
                     stop: Callable[[], bool] | None = None) -> tuple[np.ndarray | None, float]:
        """Run the vision encoder on an image chunk: (flat embeddings, seconds), the one encode path.

        Feeds the memory and disk caches and the cost model. `keep`: return a copy even when no
        cache keeps one (else mtmd's buffer, valid until the next encode under `mtmd_lock`).
        `stop`: checked while the graph runs; (None, seconds) when it stopped the encode
        (a half-computed output is neither used nor cached).
        """
        return self.encoder.encode_chunk(chunk, keep, stop)

    def known_embedding(self, chunk: Chunk, prompt: Prompt) -> np.ndarray | None:
        """An image chunk's encoder output without encoding (n_tokens x n_embd): pinned when the prompt was
        tokenized, else from the memory cache; None: the encoder must run."""
        return self.encoder.known(chunk, prompt)

    # ------------------------------------------------------------ prompts

    def tokenize(self, text: str, images: Sequence[ImageInput] = ()) -> Prompt:
        """Tokenize a rendered prompt; `text` holds `self.marker` once per image."""
        self._require_open()
        if images and not self.has_vision:
            raise VisionUnsupportedError(
                f"{self.model_path.name} was loaded without a projector (mmproj), so it cannot see images; "
                "pass mmproj=... or load the output directory"
            )
        if not self.has_vision:
            return tokenize_text(self._lmodel, text)
        pinned = {img.digest: e for img in images if (e := self.encoder.cached(img.digest)) is not None}
        with self.mtmd_lock:
            prompt = tokenize_multimodal(self._lproj, text, images, frozenset(pinned))
        short = {c.digest for c in prompt.chunks if c.kind == "image" and c.digest in pinned
                 and pinned[c.digest].size != c.n_tokens * self.n_embd_inp}
        if short:  # an entry that does not fill its grid would be read past its end: encode again
            log.warning("encoder cache: ignoring %d entry(ies) of the wrong length", len(short))
            prompt.close()
            for digest in short:
                del pinned[digest]
                self.encoder.discard(digest)
            with self.mtmd_lock:
                prompt = tokenize_multimodal(self._lproj, text, images, frozenset(pinned))
        prompt.embeddings = pinned  # held here, so eviction mid-call cannot lose them
        return prompt

    def encode_image(self, image: ImageInput) -> tuple[np.ndarray, int, int]:
        """Encoder output of one image: (n_tokens x n_embd_inp float32 array, grid_x, grid_y).

        Served from the caches when they hold it; what they store, and what the
        parity tests compare with transformers.
        """
        self._require_open()
        if not self.has_vision:
            raise VisionUnsupportedError(f"{self.model_path.name} was loaded without a projector (mmproj)")
        with self.tokenize(self.marker, [image]) as prompt:
            chunk = next(c for c in prompt.chunks if c.kind == "image")
            nx, ny = image_grid(chunk.handle)
            embd = prompt.embeddings.get(chunk.digest or "")
            if embd is None:
                embd, _ = self.encode_chunk(chunk, keep=True)
        return np.array(embd, dtype=np.float32).reshape(chunk.n_tokens, self.n_embd_inp), nx, ny

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse a prompt that cannot finish in the context before anything is evaluated."""
        if prompt_tokens + max_tokens > self.n_ctx_seq:
            raise ContextOverflowError(
                f"the prompt needs {prompt_tokens} tokens and max_tokens={max_tokens} more: "
                f"{prompt_tokens + max_tokens} > n_ctx={self.n_ctx_seq}. Raise n_ctx (e.g. "
                f"n_ctx={_round_up(prompt_tokens + max_tokens, 1024)}), lower max_tokens, "
                "use fewer/smaller images (image_max_tokens), fewer video tokens (VideoOptions "
                "max_tokens / fps / max_frames) or reset the conversation"
            )

    # ------------------------------------------------------------ evaluation

    def prefill(self, prompt: Prompt, seq_id: int = 0, reserve: int = 0) -> GenerationStats:
        """Bring the KV cache of `seq_id` to `prompt`, evaluating only the new suffix; the answer's
        stats with the prompt's part filled in.

        `reserve` is the number of tokens generation will need after the prompt.
        On error the sequence keeps what it held before the call minus at most
        the diverging suffix; its bookkeeping always matches the KV cache.
        """
        self._require_open()
        if not prompt.chunks:
            raise DecodeError("empty prompt")
        if prompt.chunks[-1].kind != "text":
            raise DecodeError("a prompt must end with text (the generation prompt)")
        self.check_fits(prompt.n_tokens, reserve)
        state = self.sequences[seq_id]
        keep = plan_reuse(state, prompt.units)
        result = GenerationStats(
            prompt_tokens=prompt.n_tokens,
            image_tokens=prompt.n_image_tokens,
            images=prompt.n_images,
            reused_tokens=sum(u.n_tokens for u in prompt.units[:keep]),
        )
        if keep < len(state):
            self.truncate(seq_id, keep)
        cursor = PromptCursor(prompt, seq_id, keep)
        t0 = time.perf_counter()
        try:
            while not cursor.done:
                chunk = cursor.current
                assert chunk is not None and self._lbatch is not None and self._lembd is not None
                if chunk.kind == "text":
                    piece = cursor.next_piece(self.n_batch)
                    assert piece is not None
                    n = len(piece.tokens)
                    self.eval_tokens(self._lbatch, [(seq_id, t, piece.final and j == n - 1)
                                                    for j, t in enumerate(piece.tokens)])
                    cursor.advance(piece)
                else:
                    if cursor.embedding(chunk) is None:
                        cursor.embeddings[chunk.digest or ""] = self.encoder.embedding(chunk, prompt, result)
                    elif cursor.offset == 0:  # the same image (a repeated frame pair) earlier in this prompt
                        result.encoder_cache_hits += 1
                    piece = cursor.next_piece(self.n_ubatch)  # one ubatch a slice, as mtmd's helper decodes it
                    assert piece is not None
                    n = piece.n
                    self.eval_image_piece(self._lembd, cursor, piece)
                result.evaluated_tokens += n
        except BaseException:
            self.truncate(seq_id, len(state))  # drop cells of a half-done batch
            raise
        result.prefill_s = time.perf_counter() - t0 - result.image_encode_s
        if self.has_vision and result.evaluated_tokens >= 32:
            self.measured("prefill", result.evaluated_tokens, result.prefill_s)
        return result

    def eval_tokens(self, batch: Batch, entries: Sequence[tuple[int, int, bool]]) -> None:
        """Evaluate (seq_id, token, logits) entries of one or many sequences in one llama_decode, each token
        at the next position of its sequence, and record them in the bookkeeping; the logits of entry i
        (when asked for) are batch output i. On failure every touched sequence drops its half-written cells."""
        self._require_open()
        next_pos: dict[int, int] = {}
        rows = []
        for seq_id, token, logits in entries:
            pos = next_pos.get(seq_id)
            if pos is None:
                pos = self.sequences[seq_id].n_pos
            rows.append((seq_id, token, pos, logits))
            next_pos[seq_id] = pos + 1
        batch.put(rows)  # text tokens carry one position: llama.cpp spreads it over the M-RoPE sections
        try:
            self.decode(batch)
        except BaseException:
            for seq_id in next_pos:
                self.truncate(seq_id, len(self.sequences[seq_id]))
            raise
        for seq_id, token, _ in entries:
            self.sequences[seq_id].append(text_units((token,))[0])

    def eval_image_slice(self, batch: EmbeddingBatch, seq_id: int, chunk: Chunk, embd: np.ndarray,
                         positions: np.ndarray, start: int, n: int) -> None:
        """Evaluate image tokens [start, start+n) of `chunk` for `seq_id` (`embd`: n_tokens x n_embd rows,
        `positions`: the chunk's decoder positions from edge_llama.image_positions). The image joins the
        sequence's bookkeeping once its last slice is in; a failed slice drops the half-written cells."""
        self._require_open()
        batch.set(embd[start:start + n], positions[:, start:start + n], seq_id)
        state = self.sequences[seq_id]
        try:
            self.decode(batch)
        except BaseException:
            self.truncate(seq_id, len(state))
            raise
        if start + n == chunk.n_tokens:
            state.append(image_unit(chunk.digest or "", chunk.n_tokens, chunk.n_pos))

    decode_seconds = 0.0  # time inside llama_decode since the model was loaded (the core's step profile)

    def decode(self, batch: Any) -> None:
        """Evaluate a token or embedding batch (edge_llama's Batch / EmbeddingBatch), the RPC wait bounded."""
        t0 = time.perf_counter()
        try:
            with self.guarded():
                self._lctx.decode_batch(batch)
        except LlamaError as exc:
            raise DecodeError(str(exc)) from exc
        finally:
            self.decode_seconds += time.perf_counter() - t0

    def add_bias(self, index: int, bias: dict[int, float]) -> None:
        """Add `bias` (token -> value) to batch output `index`'s logits, which the next `sample` reads."""
        with self.guarded():
            logits = self._lctx.logits_view(index)
            for token, value in bias.items():
                logits[token] += value

    def sample(self, sampler: Sampler, index: int = -1) -> int:
        """Sample from batch output `index`; reading logits waits for RPC workers."""
        with self.guarded():
            return sampler.sample(self._lctx, index)

    def logits_block(self, n: int) -> np.ndarray:
        """The logits of batch outputs 0..n-1 as one (n, n_vocab) array in place (as `logits_row`, n rows)."""
        with self.guarded():
            return self._lctx.logits_block(n)

    def logits_row(self, index: int = -1) -> np.ndarray:
        """Batch output `index`'s logits in place, as the last `sample` left them (its bias added:
        llama_sampler_sample copies the row into its candidates and leaves the row itself alone)."""
        with self.guarded():
            return self._lctx.logits_view(index)

    def eval_image_piece(self, batch: EmbeddingBatch, cursor: PromptCursor, piece: Piece) -> None:
        """Evaluate a slice of the image `cursor` stands at (its embeddings are in the cursor), then move on."""
        chunk = cursor.current
        embd = cursor.embedding(chunk) if chunk is not None else None
        if chunk is None or embd is None:
            raise DecodeError("no image embeddings to evaluate")
        if cursor.positions is None:
            cursor.positions = image_positions(chunk.handle, self.sequences[cursor.seq_id].n_pos, self.uses_mrope)
        self.eval_image_slice(batch, cursor.seq_id, chunk, embd, cursor.positions, piece.start, piece.n)
        cursor.advance(piece)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step
