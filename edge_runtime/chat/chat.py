"""`VisionChat`: a multimodal conversation over one `Engine`.

Each turn re-renders the whole conversation with the model's chat template; the
engine finds what is already in the KV cache, so a follow-up question about the
same image costs only its new tokens.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edge_common.manifest import resolve_model_paths
from edge_common.peak_rss import peak_rss_bytes
from edge_llama.offload import gpu_offload_available

from edge_runtime.core.detokenize import PieceTable
from edge_runtime.core.step import Answer, Core
from edge_runtime.core.generation import AnswerStep, StopReason
from edge_runtime.errors import (ChatBusyError, ContextOverflowError, EmptyPromptError, OptionError, SavedConversationError,
                                 VisionUnsupportedError)
from edge_runtime.vision.images import ImageLimits
from edge_runtime.vision.image_budget import ImagePlan, PlannedImage, check_detail, image_need
from edge_runtime.chat.messages import check_text, image_input, media_in, split_messages, user_message, videos_in
from edge_runtime.core.open_model import engine_options, open_engine
from edge_runtime.core.options import GenerationOptions
from edge_runtime.core.prompt import Prompt
from edge_runtime.vision.image_input import ImageInput
from edge_runtime.core.answer_sampler import answer_sampler
from edge_runtime.chat.saved_conversation import (
    SavedConversation,
    messages_from_json,
    messages_to_json,
    read_conversation,
    write_conversation,
)
from edge_runtime.core.stats import GenerationStats, image_report
from edge_runtime.core.template import opens_think, render_with_markers
from edge_runtime.vision.video import MTMD_MAX_TOKENS, VideoInput, VideoOptions, load_video
from edge_runtime.chat.tool_calls import ToolAnswer, ToolError, parse_calls, plan_tools, template_for, uses_tools


class Reasoning(str):
    """A piece of a Thinking model's reasoning in a stream asked `with_reasoning=True`; the answer's
    pieces are plain str, so `isinstance(piece, Reasoning)` tells them apart."""

    __slots__ = ()


class VisionChat:
    """Chat with a Qwen3-VL GGUF pair about images, keeping the conversation in the KV cache.

    Examples:
        >>> with VisionChat.from_dir("out/") as chat:
        ...     chat.ask("What is in this picture?", images=["photo.jpg"])
        ...     chat.ask("And what colour is it?")  # no re-encoding, no re-prefill
    """

    def __init__(
        self,
        model: str | Path,
        mmproj: str | Path | None = None,
        *,
        n_ctx: int = 4096,
        kv_cache_type: str | None = None,
        kv_cache_type_k: str | None = None,
        kv_cache_type_v: str | None = None,
        flash_attn: bool | str = "auto",
        mmproj_flash_attn: bool | str = "auto",
        n_gpu_layers: int | str = "auto",
        threads: int | None = None,
        image_min_tokens: int | None = None,
        image_max_tokens: int | None = None,
        detail: str = "auto",
        image_latency_s: float = 8.0,
        encoder_cache_dir: str | Path | None = None,
        encoder_cache_disk_mb: float = 1024,
        cost_cache_dir: str | Path | None = "auto",
        system_prompt: str | None = None,
        seed: int = 0,
        n_batch: int = 512,
        n_ubatch: int | None = None,
        mmap: bool | str = "auto",
        repack: bool | None = None,
        tuned_dir: str | Path | None = "auto",
        workload: str = "auto",
        rpc_servers: Sequence[str] | str = (),
        tensor_split: Sequence[float] | None = None,
        rpc_timeout_s: float = 5.0,
        rpc_stall_s: float = 300.0,
        rpc_output_on_host: bool = True,
        amx: bool | str = "auto",
        n_cpu_moe: int | str = "auto",
        override_tensor: Sequence[str] | str = (),
        encoder_cache_mb: float = 128,
        chat_template: str | None = None,
        generation: GenerationOptions | None = None,
        image_limits: ImageLimits = ImageLimits(),
        video: VideoOptions | None = None,
        seq_id: int = 0,
    ) -> None:
        options = engine_options(
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_ubatch,
            mmap=mmap,
            repack=repack,
            rpc_servers=rpc_servers,
            tensor_split=tensor_split,
            rpc_timeout_s=rpc_timeout_s,
            rpc_stall_s=rpc_stall_s,
            rpc_output_on_host=rpc_output_on_host,
            amx=amx,
            n_cpu_moe=n_cpu_moe,
            override_tensor=(override_tensor,) if isinstance(override_tensor, str) else tuple(override_tensor),
            kv_cache_type_k=kv_cache_type_k or kv_cache_type,
            kv_cache_type_v=kv_cache_type_v or kv_cache_type,
            flash_attn=flash_attn,
            mmproj_flash_attn=mmproj_flash_attn,
            tuned_dir=str(tuned_dir) if tuned_dir is not None else None,
            workload=workload,
            n_gpu_layers=n_gpu_layers,
            threads=threads,
            image_min_tokens=image_min_tokens,
            image_max_tokens=image_max_tokens,
            encoder_cache_mb=encoder_cache_mb,
            encoder_cache_dir=encoder_cache_dir,
            encoder_cache_disk_mb=encoder_cache_disk_mb,
            image_latency_s=image_latency_s,
            cost_cache_dir=cost_cache_dir,
            n_seq_max=seq_id + 1,
        )
        self.detail = check_detail(detail)
        self.engine, self.template = open_engine(model, mmproj, options, chat_template)
        self.system_prompt = system_prompt
        self.seed = seed
        self.generation = generation or GenerationOptions()
        self.image_limits = image_limits
        self.video = video or VideoOptions()
        self.seq_id = seq_id
        self.history: list[dict] = []
        self.last_stats: GenerationStats | None = None
        self._pieces = PieceTable(self.engine.text_model)
        self._core = Core(self.engine, 1)
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._attached: tuple[list[ImageInput], threading.Thread] | None = None
        self._attach_error: BaseException | None = None

    @classmethod
    def from_dir(cls, out_dir: str | Path, **kwargs: Any) -> "VisionChat":
        """Open a converter output directory (manifest.json names the text model and projector)."""
        model, mmproj = resolve_model_paths(out_dir)
        return cls(model, mmproj, **kwargs)

    # ------------------------------------------------------------ public API

    def ask(
        self, prompt: str, images: Sequence[Any] | None = None, videos: Sequence[Any] | None = None, *,
        detail: str | None = None, **gen: Any,
    ) -> str:
        """Answer `prompt` (about `images` and `videos`, if any) and add the turn to the history.

        `detail` ("low" | "auto" | "high", default the chat's) sets the token budget of
        these images; an item {"image": src, "detail": ...} sets it for one image.
        Without images, the images given to `attach` (if any) are used. A video is a
        path, bytes, a data URI, a list of frames or a T x H x W x 3 array; how it is
        sampled is `VisionChat(video=VideoOptions(...))`.
        """
        return "".join(self.stream(prompt, images, videos, detail=detail, **gen))

    def stream(
        self, prompt: str, images: Sequence[Any] | None = None, videos: Sequence[Any] | None = None, *,
        detail: str | None = None, with_reasoning: bool = False, **gen: Any,
    ) -> Iterator[str]:
        """Like `ask`, yielding text pieces as they are generated.

        The turn joins the history when the stream ends, also when the caller
        stops early (then with the text seen so far). A Thinking model's reasoning is
        never part of the answer (nor of the history); `with_reasoning=True` streams it too,
        as `Reasoning` pieces, while it is produced. After the stream, `last_stats.reasoning`
        holds it either way.
        """
        t_start = time.perf_counter()
        if not isinstance(prompt, str):
            # a plain TypeError: a non-string prompt is a caller's type error, as Python raises it
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        check_text(prompt, "the prompt")
        self._refuse_inside_stream("ask")
        attached = self._take_attached()
        need = image_need(prompt, gen.get("json_schema"))
        loaded = self._load_images(images or (), detail, need) if images or not attached else attached
        clips = self._load_videos(videos or ())
        if not prompt.strip() and not loaded and not clips:
            raise EmptyPromptError("the prompt is empty and no image was given: nothing to answer")
        history = list(self.history)
        turn = user_message(prompt, loaded, clips)
        messages = self._with_system(history + [turn])
        return self._stream(messages, media_in(messages), gen, t_start, record=history + [turn],
                            with_reasoning=with_reasoning)

    def generate(self, messages: Sequence[dict], *, tools: Sequence[dict] | None = None, tool_choice: Any = None,
                 parallel_tool_calls: bool = True, **gen: Any) -> Any:
        """Answer an OpenAI-style message list, used as given (no system_prompt added).

        The chat history is left as it was; the KV cache still serves any prefix
        these messages share with what it holds. With `tools` (OpenAI's function
        list) the answer is a `ToolAnswer` (content and tool_calls); `tool_choice`
        "required" or a function name forces a call whose arguments match its schema.
        Feed results back as {"role": "tool", "content": ...} after `answer.message()`.
        """
        if tools is None and tool_choice is None:
            return "".join(self.generate_stream(messages, **gen))
        plan = plan_tools(tools, tool_choice, parallel_tool_calls)
        grammar = plan.grammar()
        if grammar is not None:
            if gen.get("grammar") or gen.get("json_schema"):
                raise ToolError("a forced tool call cannot be combined with grammar or json_schema", "tool_choice")
            gen = {**gen, "grammar": grammar}
        text = "".join(self.generate_stream(messages, _tools=plan.template_tools(), **gen))
        content, calls = parse_calls(text) if plan.active else (text, [])
        return ToolAnswer(content, calls)

    def generate_stream(self, messages: Sequence[dict], _tools: list[dict] | None = None, *,
                        with_reasoning: bool = False, **gen: Any) -> Iterator[str]:
        """`generate` as text pieces while they are decoded (edge-serve's streams, a UI that types).

        Like `generate`, it leaves the chat history alone; `last_stats` is filled when the
        iterator ends. `with_reasoning` as for `stream`.
        """
        t_start = time.perf_counter()
        need = image_need(last_user_text(messages), gen.get("json_schema"))
        template_messages, images = split_messages(
            messages, load=lambda src, name, detail, share: self.load_image(src, detail, name, share, need),
            load_video=self.load_video
        )
        return self._stream(template_messages, images, gen, t_start, record=None, tools=_tools,
                            with_reasoning=with_reasoning)

    def load_image(self, src: Any, detail: str | None = None, name: str = "image", share: int = 1,
                   need: str = "") -> ImageInput:
        """Load and resize one image for its detail level, as the HF processor would for that budget;
        `share`: the images asked about together, which split `auto`'s latency target; `need`: what
        the answer needs to see ("text", "grounding": image_budget.image_need), which raises auto's floor."""
        if isinstance(src, dict) and "image" in src:
            src, detail = src["image"], src.get("detail", detail)
        if isinstance(src, ImageInput):
            return src
        detail = check_detail(self.detail if detail is None else detail)
        plan = self.engine.plan_image(detail, share, need) if self.engine.has_vision else None
        return image_input(src, name, self.image_limits, plan)

    def plan_image(self, image: Any, detail: str | None = None, *, prompt: str = "",
                   json_schema: Any = None) -> "PlannedImage":
        """What asking about `image` would cost, before asking: its tokens, grid, the seconds of encode +
        prefill predicted on this device and whether they meet `image_latency_s` (an app can show
        "this photo will take ~N s at M tokens"). `prompt` and `json_schema`: the question to come,
        which raise auto's floor for reading text and for boxes, as asking does."""
        if not self.engine.has_vision:
            raise VisionUnsupportedError(f"{self.engine.model_path.name} was loaded without a projector (mmproj)")
        loaded = self.load_image(image, detail, "image", 1, image_need(prompt, json_schema))
        plan = loaded.plan
        if plan is None:  # an ImageInput built by the caller: sized already, planned by nobody
            raise OptionError("plan_image needs an image source (path, bytes, PIL image, array), not an ImageInput")
        grid = (loaded.width // plan.factor, loaded.height // plan.factor)
        tokens = grid[0] * grid[1]
        return PlannedImage(plan, tokens, grid, (loaded.width, loaded.height), loaded.source_size,
                            self.engine.planner().predict_s(tokens))

    def encode_image(self, image: Any, detail: str | None = None) -> "EncodedImage":
        """The vision encoder's output for `image` at `detail`: embeddings, grid and token count.

        What the encoder caches store; the parity tests compare it with transformers.
        """
        loaded = self._load_images([image], detail)[0]
        with self._guard():
            embeddings, nx, ny = self.engine.encode_image(loaded)
        return EncodedImage(embeddings, (nx, ny), int(embeddings.shape[0]), loaded.plan, (loaded.width, loaded.height))

    def attach(self, images: Sequence[Any], *, detail: str | None = None) -> "threading.Thread":
        """Start encoding `images` and prefilling the conversation up to them, in the background.

        Returns at once (the thread, for callers that want to wait); the next
        `ask`/`stream` without images asks about these images and evaluates only
        the question. For camera apps: the photo is taken while the user types.
        Refused (ChatBusyError) from the thread that still iterates a stream of this chat:
        the prefill would wait for that stream, and the ask for the prefill.
        """
        self._refuse_inside_stream("attach")
        loaded = self._load_images(images, detail)
        messages = self._with_system(list(self.history) + [user_message(_ATTACH_SENTINEL, loaded)])
        media = media_in(messages)  # the history's images too: the template renders them all
        text = self._render(messages, media)
        prefix = text[: text.index(_ATTACH_SENTINEL)]
        self._drop_attached()  # a newer attach replaces an older one
        self._attach_error = None

        def work() -> None:
            try:
                with self._guard():
                    with self.engine.tokenize(prefix, media) as prompt:
                        if prompt.chunks and prompt.chunks[-1].kind == "text":
                            self.engine.prefill(prompt, self.seq_id)
            except BaseException as exc:  # reported by the ask that uses the images
                self._attach_error = exc

        thread = threading.Thread(target=work, name="edge-attach", daemon=True)
        self._attached = (loaded, thread)
        thread.start()
        return thread

    def reset(self) -> None:
        """Forget the conversation (the encoder cache keeps recent images) and any attached images."""
        self._drop_attached()
        with self._guard():
            self.history = []
            self.engine.reset(self.seq_id)

    def save(self, path: str | Path) -> int:
        """Write the conversation and its KV cache to `path` (atomically); returns the file size.

        `VisionChat.load(path)` or `chat.restore(path)` continue it without evaluating it again.
        """
        with self._guard():
            units, kv = self.engine.export_seq(self.seq_id)
            conv = SavedConversation(
                depends_on=self.engine.fingerprint(self.template.source),
                units=units,
                messages=messages_to_json(self.history),
                kv=kv,
                n_ctx=self.engine.n_ctx_seq,
                system_prompt=self.system_prompt,
                model_files={"model": str(self.engine.model_path.resolve()),
                             "mmproj": str(self.engine.mmproj_path.resolve()) if self.engine.mmproj_path else None},
            )
            return write_conversation(path, conv)

    def restore(self, path: str | Path) -> None:
        """Replace this chat's conversation with a saved one: history and KV cache, no prefill.

        A file saved with other model files, KV types, image-token limits, flash attention setting
        or chat template is refused (SavedConversationError) before anything is touched; one that
        llama.cpp itself refuses puts the KV cells back. Either way the current conversation
        (history and KV cache) is kept as it was.
        """
        self._restore(read_conversation(path), path)

    def _restore(self, conv: SavedConversation, path: str | Path) -> None:
        conv.check_fits(self.engine.fingerprint(self.template.source), self.engine.n_ctx_seq, path)
        history = messages_from_json(conv.messages, path)
        with self._guard():
            self.engine.import_seq(self.seq_id, conv.units, conv.kv)  # a refusal keeps the cells it held
            self.history = history
            self.system_prompt = conv.system_prompt

    @classmethod
    def load(cls, path: str | Path, model: str | Path | None = None, mmproj: str | Path | None = None,
             **kwargs: Any) -> "VisionChat":
        """Open the model a conversation was saved with (or `model`: a file or output directory) and restore it.

        The KV settings must be the saved ones: pass the same kv_cache_type / image_*_tokens /
        flash_attn / chat_template.
        """
        conv = read_conversation(path)
        conv_files = conv.model_files or {}
        if model is None:
            model, mmproj = conv_files.get("model"), conv_files.get("mmproj")
            if not model:
                raise SavedConversationError(f"{path} names no model file: pass model=...")
        chat = cls.from_dir(model, **kwargs) if Path(model).is_dir() else cls(model, mmproj, **kwargs)
        try:
            chat._restore(conv, path)
        except BaseException:
            chat.close()
            raise
        return chat

    def close(self) -> None:
        """Free the model, context and projector now (they hold GBs) instead of at garbage collection."""
        self._drop_attached()  # its thread uses the engine
        self._core.close()
        self.engine.close()

    def __enter__(self) -> "VisionChat":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def thinking(self) -> bool:
        """A Thinking model (its template opens <think> for every answer): answers come with a reasoning."""
        return self.template.thinking

    @property
    def has_vision(self) -> bool:
        """Whether a projector is loaded: without one, images and videos are refused."""
        return self.engine.has_vision

    # ------------------------------------------------------------ internals

    def _load_images(self, images: Sequence[Any], detail: str | None = None, need: str = "") -> list[ImageInput]:
        images = self._media_list(images, "images")
        if detail is not None:
            check_detail(detail)
        return [self.load_image(src, detail, f"image {i + 1}", len(images), need) for i, src in enumerate(images)]

    def _media_list(self, items: Any, what: str) -> list[Any]:
        if isinstance(items, (str, Path, bytes, dict)) or not isinstance(items, Sequence):
            items = [items]  # a single image or clip where a list was expected
        if items and not self.engine.has_vision:
            raise VisionUnsupportedError(
                f"{self.engine.model_path.name} was loaded without a projector (mmproj), so it cannot see "
                f"{what}; pass mmproj=... or open the converter's output directory"
            )
        return list(items)

    def load_video(self, src: Any, name: str = "video") -> VideoInput:
        """A clip sampled and sized for this engine (its device's token budget, the projector's bounds)."""
        opts = self.engine.options
        return load_video(
            src, name, self.video,
            on_gpu=self.engine.n_gpu_layers != 0 and gpu_offload_available(),
            frame_max_tokens=opts.image_max_tokens or MTMD_MAX_TOKENS,
        )

    def _load_videos(self, videos: Sequence[Any]) -> list[VideoInput]:
        return [self.load_video(src, f"video {i + 1}") for i, src in enumerate(self._media_list(videos, "videos"))]

    def _drop_attached(self) -> None:
        try:
            self._take_attached()
        except Exception:  # the attach failed; nobody asks about its images any more
            pass

    def _take_attached(self) -> list[ImageInput]:
        """The images of a pending `attach` (waiting for its prefill); [] if none."""
        if self._attached is None:
            return []
        loaded, thread = self._attached
        self._attached = None
        thread.join()
        error, self._attach_error = self._attach_error, None
        if error is not None:
            raise error
        return loaded

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt and not (messages and messages[0].get("role") == "system"):
            return [{"role": "system", "content": self.system_prompt}] + messages
        return messages

    def _render(self, messages: list[dict], images: Sequence[ImageInput], tools: list[dict] | None = None) -> str:
        marker = self.engine.marker if self.engine.has_vision else None
        videos = videos_in(messages)
        template = template_for(self.template, tools=bool(tools) or uses_tools(messages), videos=bool(videos))
        return render_with_markers(template, messages, len(images), marker, videos,
                                   **({"tools": tools} if tools else {}))

    def _guard(self) -> "_Guard":
        return _Guard(self)

    def _refuse_inside_stream(self, what: str) -> None:
        if self._owner == threading.get_ident():
            raise ChatBusyError(f"{what}: a stream is still open on this chat in this thread; "
                                "read it to the end or close() it first")

    def _stream(
        self,
        messages: list[dict],
        images: Sequence[ImageInput],
        gen: dict,
        t_start: float,
        record: list[dict] | None,
        tools: list[dict] | None = None,
        with_reasoning: bool = False,
    ) -> Iterator[str]:
        """Validate and tokenize now, so bad input raises at the call rather than at first next()."""
        options = self.generation.updated(gen)
        text = self._render(messages, images, tools)
        prompt = self.engine.tokenize(text, images)
        try:
            max_tokens = options.max_tokens or (self.engine.n_ctx_seq - prompt.n_tokens)
            if max_tokens < 1:
                raise ContextOverflowError(
                    f"the prompt needs {prompt.n_tokens} tokens, the whole n_ctx={self.engine.n_ctx_seq}: "
                    "raise n_ctx or reset the conversation"
                )
            self.engine.check_fits(prompt.n_tokens, max_tokens)
        except BaseException:
            prompt.close()
            raise
        return self._run(prompt, images, options, max_tokens, t_start, opens_think(text), record, with_reasoning)

    def _run(
        self,
        prompt: Prompt,
        images: Sequence[ImageInput],
        options: GenerationOptions,
        max_tokens: int,
        t_start: float,
        starts_inside: bool,
        record: list[dict] | None,
        with_reasoning: bool = False,
    ) -> Iterator[str]:
        """Prefill, sample and detokenize. `record` (history + new user turn) is
        stored with the answer when the stream ends or the caller closes it; after
        an error the history stays as it was (the KV cache is rolled back too)."""
        stats = GenerationStats()
        shown: list[str] = []
        reasoning: list[str] = []
        answer: Answer | None = None
        finished = cancelled = False
        with self._guard():
            try:
                with prompt:
                    stats = self.engine.prefill(prompt, self.seq_id, reserve=max_tokens)
                    stats.image_details = [image_report(img, chunk.n_tokens) for img, chunk in
                                           zip(images, (c for c in prompt.chunks if c.kind == "image"))]
                seed = options.seed if options.seed is not None else self.seed
                step = AnswerStep(self._pieces, options, max_tokens, starts_inside, self.engine.is_end_of_turn)
                answer = Answer(self.seq_id, answer_sampler(options, self.engine.text_model, seed, step), step, stats,
                                top_logprobs=options.top_logprobs)
                t_first = None
                try:
                    piece = self._core.start(answer)  # the one per-token step the server runs for all its slots
                    t_first = time.perf_counter()
                    stats.ttft_s = t_first - t_start
                    while True:
                        thought = step.take_reasoning()
                        if thought:
                            reasoning.append(thought)
                            if with_reasoning:
                                yield Reasoning(thought)
                        if piece:
                            shown.append(piece)
                            yield piece
                        if answer.done:  # evaluate nothing more
                            break
                        piece = self._core.step([answer])[0]
                    tail = step.finish()  # "" after a stop string
                    thought = step.take_reasoning()
                    if thought:
                        reasoning.append(thought)
                        if with_reasoning:
                            yield Reasoning(thought)
                    if tail:
                        shown.append(tail)
                        yield tail
                finally:
                    t_end = time.perf_counter()
                    if t_first is not None:
                        stats.decode_s = t_end - t_first
                    else:
                        stats.ttft_s = t_end - t_start
                finished = True
            except GeneratorExit:  # the caller stopped reading: keep what it saw
                cancelled = True
                raise
            finally:
                if answer is not None:
                    if not finished:
                        answer.cancel()
                    answer.close()
                    stats.logprobs = answer.logprobs
                    stats.thinking_tokens = answer.step.thinking_tokens
                elif not finished:
                    stats.stop_reason = StopReason.CANCELLED
                stats.reasoning = "".join(reasoning)
                stats.kv_cache_bytes = self.engine.kv_cache_bytes
                stats.kv_used_bytes = self.engine.kv_used_bytes(self.seq_id)
                stats.peak_rss_bytes = peak_rss_bytes()
                self.last_stats = stats
                if record is not None and (finished or (cancelled and shown)):
                    self.history = record + [{"role": "assistant", "content": "".join(shown)}]


class _Guard:
    """One answer at a time per chat; a second call from the thread that is still
    iterating a stream would corrupt the KV bookkeeping, so it is refused."""

    def __init__(self, chat: VisionChat) -> None:
        self._chat = chat

    def __enter__(self) -> None:
        chat = self._chat
        if chat._owner == threading.get_ident():
            raise ChatBusyError("a stream is still open on this chat: read it to the end or close() it first")
        chat._lock.acquire()
        chat._owner = threading.get_ident()

    def __exit__(self, *exc: object) -> None:
        self._chat._owner = None
        self._chat._lock.release()



# Stands for the question while rendering an attached turn; the prompt is cut before it.
_ATTACH_SENTINEL = "\u2063ATTACHED-IMAGES-END\u2063"


def last_user_text(messages: Sequence[Any]) -> str:
    """The text of the last user message (its text parts joined): the question its images serve."""
    for message in reversed(messages if isinstance(messages, (list, tuple)) else ()):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, (list, tuple)):
                return " ".join(p.get("text", "") for p in content
                                if isinstance(p, dict) and isinstance(p.get("text"), str))
            return ""
    return ""


@dataclass(frozen=True)
class EncodedImage:
    """`VisionChat.encode_image`'s result."""

    embeddings: np.ndarray  # n_tokens x n_embd_inp float32 (main + deepstack features)
    grid: tuple[int, int]  # merged tokens across, down
    n_tokens: int
    plan: ImagePlan | None
    size: tuple[int, int]  # the resized image's width, height
