"""Stage B of HALO's EM-CoT pipeline: two interchangeable annotators and an on-disk cache.

- :class:`OpenAIAnnotator` talks to any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM / SGLang
  serving Qwen3-VL, or a hosted API) with HALO's three calls (reference halo_bagel.md §5.2): (1) the plan, a
  JSON list of imperative subtasks; (2) the alignment of the subtasks to frame ranges with first-person
  reasoning of at most 50 words; (3) optionally a scene description. Frames go as JPEG images sub-sampled to
  a budget, the primitive log (stage A) as text. Replies are parsed strictly; a reply that does not parse or
  fails validation gets one repair round (the model is told what was wrong). HTTP 408/409/429/5xx and
  transport errors are retried with exponential back-off (``Retry-After`` honoured).
- :class:`RulesAnnotator` needs no model: it splits the episode at the gripper events of stage A and names
  the phases from a task-specific template (scripted demos such as Meta-World, where the phases are known).

:func:`annotate_episodes` runs an annotator over episodes with bounded concurrency and an
:class:`AnnotationCache` keyed by (episode content hash, prompt version, model, settings): a re-run costs
nothing and an interrupted run resumes. Failed episodes are returned with their reasons, never dropped.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .annotation import (AnnotationError, EpisodeAnnotation, ReplyError, SubtaskSpan, limit_words, match_subtask,
                         parse_json_reply, validate_spans)
from .primitives import EpisodePrimitives, PrimitiveConfig, StateLayout, extract_primitives

__all__ = ["EpisodeInput", "OpenAIAnnotator", "RulesAnnotator", "AnnotationCache", "AnnotationRun",
           "annotate_episodes", "PROMPT_VERSION", "sample_frame_ids"]

PROMPT_VERSION = "emcot-v1"
_IGNORED_SUBTASKS = {"", "idle", "none", "unknown"}  # HALO drops these from a plan


@dataclass
class EpisodeInput:
    """What an annotator sees of one episode: the task, ``fps``, the state vectors [T, S] (stage A's input),
    and optionally ``frame(t)`` returning the camera image of frame t (uint8 HWC, or float CHW in [0, 1]) for
    annotators that look at images."""

    episode_index: int
    task: str
    fps: float
    states: np.ndarray
    frame: Callable[[int], Any] | None = None
    primitives: EpisodePrimitives | None = None

    @property
    def num_frames(self) -> int:
        """Number of frames T of the episode."""
        return int(self.states.shape[0])

    def content_hash(self) -> str:
        """sha256 over the task, fps and the state values (what every annotator's answer depends on)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.task, float(self.fps), list(self.states.shape)]).encode())
        h.update(np.ascontiguousarray(self.states, dtype=np.float64).tobytes())
        return h.hexdigest()

    def with_primitives(self, layout: StateLayout, cfg: PrimitiveConfig | None = None) -> "EpisodeInput":
        """Fill ``primitives`` (stage A) from the states when missing; returns self."""
        if self.primitives is None:
            self.primitives = extract_primitives(self.states, layout, cfg)
        return self


# ---------------------------------------------------------------------------------------------- cache
class AnnotationCache:
    """One JSON file per (episode content, annotator identity) under ``folder``; writes are atomic."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    @staticmethod
    def key(episode: EpisodeInput, identity: Mapping) -> str:
        """The cache key of an episode's content and the annotator's identity (settings, model, prompt version)."""
        blob = json.dumps({"episode": episode.content_hash(), **identity}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        """The JSON file of cache entry ``key``."""
        return self.folder / f"{key}.json"

    def get(self, key: str) -> EpisodeAnnotation | None:
        """The cached annotation of ``key``, or None; an unreadable entry is an error naming the file."""
        p = self.path(key)
        if not p.exists():
            return None
        try:
            return EpisodeAnnotation.from_dict(json.loads(p.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise AnnotationError(f"cache entry {p} is unreadable ({e}); delete it to re-annotate") from None

    def put(self, key: str, ann: EpisodeAnnotation):
        """Store ``ann`` under ``key`` (written to a temporary file, then renamed)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(key).with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps(ann.to_dict(), indent=1))
        os.replace(tmp, self.path(key))


# ---------------------------------------------------------------------------------------------- rules
class RulesAnnotator:
    """Subtasks from stage-A gripper events and a task-specific template, no model.

    The episode splits right after every run of ``grasp`` / ``release`` frames (of any arm): N events give N + 1
    phases. ``templates`` maps a task string (matched exactly, then case- and punctuation-insensitively) or
    ``"*"`` to the list of subtask names; ``{task}`` in a name is replaced by the task. A template with fewer
    entries than phases keeps its last subtask to the end (later events fall inside it); one with more entries
    than phases is an error for that episode. A task without a template gets one subtask, the task itself.
    """

    name = "rules"

    def __init__(self, templates: Mapping[str, Sequence[str]] | None = None,
                 split_on: Sequence[str] = ("grasp", "release")):
        self.templates = {k: list(v) for k, v in (templates or {}).items()}
        for k, v in self.templates.items():
            if not v or not all(isinstance(s, str) and s.strip() for s in v):
                raise ValueError(f"rules template {k!r}: need a non-empty list of subtask names")
        self.split_on = tuple(split_on)

    def identity(self) -> dict:
        """What determines this annotator's output (its cache identity)."""
        return {"annotator": self.name, "templates": self.templates, "split_on": list(self.split_on),
                "prompt_version": PROMPT_VERSION}

    def template_for(self, task: str) -> list[str] | None:
        """The subtask template of ``task`` (exact, then case/punctuation-insensitive, then ``*``), with ``{task}``
        filled in; None without one."""
        if task in self.templates:
            t = self.templates[task]
        else:
            norm = {re.sub(r"[^a-z0-9]+", " ", k.lower()).strip(): v for k, v in self.templates.items()}
            t = norm.get(re.sub(r"[^a-z0-9]+", " ", task.lower()).strip(), self.templates.get("*"))
        return None if t is None else [s.replace("{task}", task) for s in t]

    def boundaries(self, prims: EpisodePrimitives) -> list[int]:
        """First frames of the phases after the first: one past the end of each gripper-event run."""
        cuts = {seg.end + 1 for segs in prims.segments.values() for seg in segs if seg.action in self.split_on}
        return sorted(c for c in cuts if 0 < c < prims.num_frames)

    def annotate(self, ep: EpisodeInput) -> EpisodeAnnotation:
        """Annotate an episode without a model: the template's subtasks over the phases cut at gripper events
        (grasp/release runs); ``AnnotationError`` when the template has more subtasks than phases."""
        if ep.primitives is None:
            raise AnnotationError(f"episode {ep.episode_index}: the rules annotator needs stage-A primitives")
        T = ep.num_frames
        plan = self.template_for(ep.task) or [ep.task.strip().rstrip(".")]
        cuts = self.boundaries(ep.primitives)
        if len(plan) > len(cuts) + 1:
            raise AnnotationError(f"episode {ep.episode_index}: the template for {ep.task!r} has {len(plan)} "
                                  f"subtasks but the episode shows only {len(cuts) + 1} gripper phases "
                                  f"(events end at frames {[c - 1 for c in cuts]})")
        starts = [0] + cuts[:len(plan) - 1]
        ends = [s - 1 for s in starts[1:]] + [T - 1]
        spans = [SubtaskSpan(p, s, e) for p, s, e in zip(plan, starts, ends)]
        ann = EpisodeAnnotation(ep.episode_index, ep.task, T, float(ep.fps), plan, spans, annotator=self.name,
                                prompt_version=PROMPT_VERSION)
        ann.validate()
        return ann


# ---------------------------------------------------------------------------------------------- openai
def sample_frame_ids(num_frames: int, budget: int) -> list[int]:
    """``budget`` frame indices evenly spread over the episode, first and last included."""
    if num_frames <= budget:
        return list(range(num_frames))
    if budget == 1:
        return [0]
    return sorted({round(i * (num_frames - 1) / (budget - 1)) for i in range(budget)})


def _to_jpeg_data_url(img, max_side: int, quality: int) -> str:
    from PIL import Image
    a = img.detach().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)  # CHW -> HWC
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    im = Image.fromarray(a).convert("RGB")
    scale = max_side / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


_RETRYABLE = {408, 409, 429}


class OpenAIAnnotator:
    """HALO's VLM annotation (three calls) against an OpenAI-compatible chat-completions endpoint.

    ``base_url`` ends before ``/chat/completions`` (e.g. ``http://localhost:8000/v1``); the API key is read
    from the environment variable ``api_key_env`` (not required by local servers). ``max_images`` bounds the
    frames sent per call (evenly sub-sampled), ``image_max_side`` their size. ``scene`` adds call 3.
    ``max_retries`` HTTP retries per request with back-off ``backoff · 2^k`` seconds (capped at
    ``max_backoff``); ``repair_rounds`` extra rounds per call for a reply that does not parse or validate.
    """

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_images: int = 16,
                 image_max_side: int = 448, jpeg_quality: int = 85, scene: bool = False, temperature: float = 0.0,
                 max_tokens: int = 2048, timeout: float = 300.0, max_retries: int = 5, backoff: float = 2.0,
                 max_backoff: float = 60.0, repair_rounds: int = 1, reasoning_words: int = 50,
                 fuzzy_cutoff: float = 0.6):
        try:
            import httpx
        except ImportError:
            raise ImportError("the openai annotator needs httpx: pip install vla-blocks[emcot]") from None
        if max_images < 1:
            raise ValueError("max_images must be >= 1")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = os.environ.get(api_key_env) or None
        self.max_images, self.image_max_side, self.jpeg_quality = max_images, image_max_side, jpeg_quality
        self.scene, self.temperature, self.max_tokens = scene, temperature, max_tokens
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.repair_rounds, self.reasoning_words, self.fuzzy_cutoff = repair_rounds, reasoning_words, fuzzy_cutoff
        self._client = httpx.Client(timeout=timeout)
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "http_retries": 0, "repairs": 0}

    def identity(self) -> dict:
        """What determines this annotator's output (its cache identity): model, prompt version and image settings."""
        return {"annotator": self.name, "model": self.model, "prompt_version": PROMPT_VERSION,
                "max_images": self.max_images, "image_max_side": self.image_max_side, "scene": self.scene,
                "temperature": self.temperature}

    def close(self):
        """Close the HTTP client."""
        self._client.close()

    def _count(self, key: str):
        with self._lock:
            self.stats[key] += 1

    # -------------------------------------------------------------- HTTP
    def chat(self, messages: list[dict]) -> str:
        """One chat-completions request with retries; returns the assistant's text."""
        import httpx
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        url = f"{self.base_url}/chat/completions"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("http_retries")
            self._count("requests")
            wait = min(self.max_backoff, self.backoff * 2 ** attempt)
            try:
                r = self._client.post(url, json=body, headers=headers)
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    return self._content(r)
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code not in _RETRYABLE and r.status_code < 500:
                    raise AnnotationError(f"{url}: {last}")
                retry_after = r.headers.get("retry-after")
                if retry_after is not None:
                    try:
                        wait = min(self.max_backoff, max(wait, float(retry_after)))
                    except ValueError:
                        pass
            if attempt < self.max_retries:
                time.sleep(wait)
        raise AnnotationError(f"{url}: gave up after {self.max_retries + 1} attempts ({last})")

    @staticmethod
    def _content(r) -> str:
        try:
            msg = r.json()["choices"][0]["message"]
            content = msg["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise AnnotationError(f"not a chat-completions response: {r.text[:200]}") from None
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise AnnotationError(f"chat-completions message content is {type(content).__name__}, not text")
        return content

    def ask(self, messages: list[dict], check: Callable[[str], Any], what: str) -> Any:
        """Send ``messages``; ``check(reply)`` parses and validates (raising :class:`ReplyError`). A failing reply
        gets ``repair_rounds`` more rounds, each telling the model what was wrong."""
        messages = list(messages)
        for round_ in range(self.repair_rounds + 1):
            reply = self.chat(messages)
            try:
                return check(reply)
            except ReplyError as e:
                err = str(e)
                if round_ == self.repair_rounds:
                    raise ReplyError(f"{what}: {err} (after {self.repair_rounds} repair round(s))") from None
                self._count("repairs")
                messages += [{"role": "assistant", "content": reply},
                             {"role": "user", "content": f"Your reply cannot be used: {err}. Answer again with "
                                                         f"only the corrected JSON, no other text."}]

    # -------------------------------------------------------------- prompts
    def _images(self, ep: EpisodeInput) -> list[dict]:
        if ep.frame is None:
            return []
        parts = []
        for k, t in enumerate(sample_frame_ids(ep.num_frames, self.max_images)):
            parts.append({"type": "text", "text": f"Image {k + 1}: frame {t}"})
            parts.append({"type": "image_url", "image_url": {"url": _to_jpeg_data_url(
                ep.frame(t), self.image_max_side, self.jpeg_quality)}})
        return parts

    def plan_prompt(self, ep: EpisodeInput) -> str:
        """The text of call 1 (planning): the task, frame count and the stage-A primitive log; asks for a JSON list of
        subtasks."""
        log = "\n".join(ep.primitives.log_lines())
        return (
            "You analyse robot manipulation demonstrations. Break the demonstration below into its high-level "
            "subtasks: each one states WHAT is achieved (its purpose), finer than the overall task and coarser "
            "than single motions, all at a similar granularity, and all serving the overall task.\n"
            f"Overall task: {ep.task}\n"
            f"The episode has {ep.num_frames} frames (0 to {ep.num_frames - 1}) at {ep.fps:g} frames per second; "
            "the images are frames of it, labelled with their frame numbers.\n"
            "Low-level arm motions per frame (context only, do not copy them):\n"
            f"{log}\n\nRules:\n"
            "1. Never name low-level motions (reach, move, grasp, open, close, idle, adjust).\n"
            "2. Use short imperative phrases in the active voice, e.g. 'Pick up the red cup'.\n"
            "3. When both arms cooperate on one goal, give ONE subtask for it.\n"
            "4. Count the objects that are manipulated and cover exactly those. Handle one object at a time: "
            "finish its whole pick-and-place (or stack, hold, ...) loop before the next object, and keep the "
            "subtasks of one object contiguous.\n"
            "Reply with ONLY a JSON list of strings, e.g. [\"Pick up the red cup\", \"Place the cup on the "
            "tray\"]."
        )

    def align_prompt(self, ep: EpisodeInput, plan: Sequence[str]) -> str:
        """The text of call 2 (alignment and reasoning): the plan and primitive log; asks for each subtask's frame span
        and first-person reasoning as JSON."""
        steps = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(plan))
        log = "\n".join(ep.primitives.log_lines())
        return (
            "You are the robot that performed this demonstration; think in the first person (I, my).\n"
            f"My overall goal: {ep.task}\n"
            f"The episode has {ep.num_frames} frames, numbered 0 to {ep.num_frames - 1}; the images are frames "
            "of it, labelled with their frame numbers.\n"
            f"My planned subtasks, in order:\n{steps}\n\n"
            f"My recorded arm motions (ground truth):\n{log}\n\nInstructions:\n"
            "1. Assign every frame to one planned subtask: give each subtask a contiguous frame range "
            f"[start, end] (both inclusive). Ranges follow the plan's order, start at frame 0, end at frame "
            f"{ep.num_frames - 1}, and leave no gaps or overlaps.\n"
            "2. A subtask that needs motion cannot start while my recorded motions still show my arms idle; "
            "place its start where the motion begins.\n"
            f"3. For each range, give my reasoning in at most {self.reasoning_words} words: what I see, why "
            "this subtask is the right next step toward my goal, and which movements I am making. No frame "
            "numbers in the reasoning.\n"
            "Reply with ONLY a JSON list of objects: "
            "[{\"subtask\": \"...\", \"frame\": [start, end], \"reasoning\": \"...\"}]."
        )

    def scene_prompt(self, ep: EpisodeInput) -> str:
        """The text of the optional call 3: a short description of the first frame's scene."""
        return (
            f"This is the first frame of a robot demonstration of the task: {ep.task}\n"
            "Describe the scene in 1-2 sentences each on: the layout, the poses of the objects, the robot's "
            "state, the objects' attributes, and their spatial relations. Reply with plain text."
        )

    def _user(self, text: str, images: list[dict]) -> list[dict]:
        return [{"role": "user", "content": [{"type": "text", "text": text}, *images]}]

    # -------------------------------------------------------------- checks
    @staticmethod
    def check_plan(reply: str) -> list[str]:
        """Parse call 1's reply into the plan (non-empty list of strings); :class:`ReplyError` says what is wrong."""
        value = parse_json_reply(reply, list)
        if not all(isinstance(s, str) for s in value):
            raise ReplyError("the plan must be a JSON list of strings")
        plan = [s.strip() for s in value if s.strip().lower() not in _IGNORED_SUBTASKS]
        if not plan:
            raise ReplyError("the plan is empty")
        return plan

    def check_alignment(self, reply: str, plan: Sequence[str], num_frames: int) -> list[SubtaskSpan]:
        """Parse call 2's reply into spans that name plan entries and cover the episode (:func:`validate_spans`);
        :class:`ReplyError` lists the problems."""
        value = parse_json_reply(reply, list)
        spans, problems = [], []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                problems.append(f"item {i} is not an object")
                continue
            name, fr = item.get("subtask"), item.get("frame")
            if not isinstance(name, str):
                problems.append(f"item {i} has no 'subtask' string")
                continue
            if (not isinstance(fr, list) or len(fr) != 2
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and float(x).is_integer()
                               for x in fr)):
                problems.append(f"item {i} ({name!r}): 'frame' must be [start, end] integers")
                continue
            j = match_subtask(name, plan, self.fuzzy_cutoff)
            if j is None:
                problems.append(f"item {i}: subtask {name!r} is not one of the planned subtasks {list(plan)}")
                continue
            reasoning = item.get("reasoning", "")
            spans.append(SubtaskSpan(plan[j], int(fr[0]), int(fr[1]),
                                     limit_words(reasoning if isinstance(reasoning, str) else "",
                                                 self.reasoning_words)))
        if not problems:
            problems = validate_spans(spans, num_frames, plan)
        if problems:
            raise ReplyError("; ".join(problems))
        return spans

    # -------------------------------------------------------------- the three calls
    def annotate(self, ep: EpisodeInput) -> EpisodeAnnotation:
        """Annotate an episode with the served VLM: plan (call 1), alignment and reasoning (call 2), optional scene
        (call 3), each reply checked and repaired."""
        if ep.primitives is None:
            raise AnnotationError(f"episode {ep.episode_index}: the openai annotator needs stage-A primitives")
        images = self._images(ep)
        plan = self.ask(self._user(self.plan_prompt(ep), images), self.check_plan, "plan (call 1)")
        spans = self.ask(self._user(self.align_prompt(ep, plan), images),
                         lambda r: self.check_alignment(r, plan, ep.num_frames), "alignment (call 2)")
        scene = None
        if self.scene:
            first = images[:2]  # frame 0
            scene = self.chat(self._user(self.scene_prompt(ep), first)).strip() or None
        return EpisodeAnnotation(ep.episode_index, ep.task, ep.num_frames, float(ep.fps), plan, spans, scene=scene,
                                 annotator=self.name, model=self.model, prompt_version=PROMPT_VERSION)


# ---------------------------------------------------------------------------------------------- running
@dataclass
class AnnotationRun:
    """The outcome of :func:`annotate_episodes`: annotations by episode index, failures with reasons."""

    annotations: dict[int, EpisodeAnnotation] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    cache_hits: int = 0

    def summary(self) -> dict:
        """Counts of the run (episodes, annotated, failed, cache hits), subtasks per episode and each failure's reason.
        """
        n = [len(a.spans) for a in self.annotations.values()]
        return {"episodes": len(self.annotations) + len(self.failures), "annotated": len(self.annotations),
                "failed": len(self.failures), "cache_hits": self.cache_hits,
                "subtasks_per_episode": {"min": min(n), "mean": round(sum(n) / len(n), 2), "max": max(n)} if n else None,
                "failures": {str(k): v for k, v in sorted(self.failures.items())}}


def annotate_episodes(episodes: Sequence[EpisodeInput] | Callable, annotator, cache: AnnotationCache | None = None,
                      concurrency: int = 4, progress: bool = False, num_episodes: int | None = None) -> AnnotationRun:
    """Annotate every episode (an :class:`EpisodeInput` sequence, or an iterable of them), ``concurrency`` at a
    time; cached answers are reused, new ones cached as they arrive (so an interrupted run resumes)."""
    run = AnnotationRun()
    identity = annotator.identity()
    lock = threading.Lock()

    def one(ep: EpisodeInput):
        key = AnnotationCache.key(ep, identity) if cache is not None else None
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                return ep.episode_index, hit, True, None
        try:
            ann = annotator.annotate(ep)
        except AnnotationError as e:
            return ep.episode_index, None, False, str(e)
        if cache is not None:
            cache.put(key, ann)
        return ep.episode_index, ann, False, None

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_episodes if num_episodes is not None else (len(episodes) if hasattr(episodes, "__len__")
                                                                          else None),
                   desc=f"annotate ({annotator.name})", unit="ep")
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [pool.submit(one, ep) for ep in episodes]
        for fut in as_completed(futures):
            idx, ann, hit, err = fut.result()
            with lock:
                if ann is not None:
                    run.annotations[idx] = ann
                    run.cache_hits += int(hit)
                else:
                    run.failures[idx] = err
            if bar is not None:
                bar.update(1)
                bar.set_postfix(failed=len(run.failures), cached=run.cache_hits)
    if bar is not None:
        bar.close()
    return run
