"""The ``openai`` EM-CoT annotator against a local chat-completions server started by the test, answering from a
script per episode: valid replies, malformed JSON, wrong frame ranges, HTTP 429 / 500 / 400; checks retries,
repair rounds, validation, fuzzy matching, images sent, and the on-disk cache (re-run and resume)."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

pytest.importorskip("httpx")
from PIL import Image  # noqa: E402

from vla_blocks.emcot import (AnnotationCache, EpisodeInput, OpenAIAnnotator, StateLayout,  # noqa: E402
                              annotate_episodes, sample_frame_ids)

LAYOUT = StateLayout.from_mapping({"left": {"xyz": [0, 1, 2], "gripper": 3}})
PLAN = ["Pick up the red cup", "Place the cup on the tray"]


class ScriptedServer:
    """Chat-completions server: the task named in the prompt picks a queue of scripted answers, each
    ``(status, content, headers)``; a str content becomes the assistant message. Requests are recorded."""

    def __init__(self):
        self.scripts: dict[str, list] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = json.dumps(body["messages"])
                with server.lock:
                    server.requests.append({"path": self.path, "body": body,
                                            "auth": self.headers.get("Authorization")})
                    task = next((t for t in server.scripts if t in text), None)
                    step = server.scripts[task].pop(0) if task and server.scripts[task] else (
                        500, "no script left", {})
                status, content, headers = step
                if status == 200:
                    payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                          "choices": [{"index": 0, "finish_reason": "stop",
                                                       "message": {"role": "assistant", "content": content}}]})
                else:
                    payload = json.dumps({"error": {"message": content}})
                data = payload.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def for_task(self, task):
        return [r for r in self.requests if task in json.dumps(r["body"]["messages"])]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.close()


def ok(content):
    return (200, content if isinstance(content, str) else json.dumps(content), {})


def episode(i, task, T=30):
    """A one-arm episode: idle, move right, close the gripper, move up; frames are small coloured images."""
    s = np.zeros((T, 4))
    s[:, 3] = 1.0
    s[5:15, 0] = np.arange(1, 11) * 0.02
    s[15:, 0] = s[14, 0]
    s[15:18, 3] = [0.6, 0.3, 0.0]
    s[18:, 3] = 0.0
    s[18:, 2] = np.arange(1, T - 17) * 0.02
    frame = lambda t: np.full((24, 32, 3), (t * 8) % 256, dtype=np.uint8)  # noqa: E731
    return EpisodeInput(i, task, 10.0, s, frame=frame).with_primitives(LAYOUT)


def alignment(T=30, cut=15, names=PLAN):
    return [{"subtask": names[0], "frame": [0, cut - 1], "reasoning": "I see the red cup near my gripper."},
            {"subtask": names[1], "frame": [cut, T - 1], "reasoning": "I hold the cup and carry it to the tray."}]


def annotator(server, **kw):
    kw = {"max_images": 4, "backoff": 0.001, "max_backoff": 0.01, **kw}
    return OpenAIAnnotator(server.url, "qwen3-vl-test", **kw)


def test_valid_answers_images_prompt_and_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    task = "put the red cup on the tray"
    server.scripts[task] = [ok(PLAN), ok("```json\n" + json.dumps(alignment()) + "\n```"), ok("A table with a cup.")]
    ann_ = annotator(server, scene=True)
    cache = AnnotationCache(tmp_path / "cache")
    run = annotate_episodes([episode(0, task)], ann_, cache)
    assert run.failures == {}
    a = run.annotations[0]
    assert a.plan == PLAN and [(s.subtask, s.start, s.end) for s in a.spans] == [(PLAN[0], 0, 14), (PLAN[1], 15, 29)]
    assert a.spans[0].reasoning == "I see the red cup near my gripper." and a.scene == "A table with a cup."
    assert (a.model, a.annotator) == ("qwen3-vl-test", "openai")
    reqs = server.for_task(task)
    assert len(reqs) == 3 and all(r["path"] == "/v1/chat/completions" for r in reqs)
    assert reqs[0]["auth"] == "Bearer sk-test" and reqs[0]["body"]["model"] == "qwen3-vl-test"
    parts = reqs[0]["body"]["messages"][0]["content"]
    text = parts[0]["text"]
    assert "Frames 5-14: Left: Move the left gripper to the right." in text and "JSON list of strings" in text
    # 4 images, evenly sub-sampled with their frame numbers, decodable JPEGs of the right frames
    labels = [p["text"] for p in parts[1:] if p["type"] == "text"]
    assert labels == [f"Image {k + 1}: frame {t}" for k, t in enumerate(sample_frame_ids(30, 4))] and \
        sample_frame_ids(30, 4) == [0, 10, 19, 29]
    img = [p for p in parts if p["type"] == "image_url"][1]["image_url"]["url"]
    pix = np.asarray(Image.open(io.BytesIO(base64.b64decode(img.split(",", 1)[1]))))
    assert pix.shape == (24, 32, 3) and abs(float(pix.mean()) - 80) < 2
    assert "1. Pick up the red cup" in reqs[1]["body"]["messages"][0]["content"][0]["text"]
    # a re-run costs nothing: every episode from the cache, no request
    again = annotate_episodes([episode(0, task)], annotator(server, scene=True), cache)
    assert again.cache_hits == 1 and len(server.for_task(task)) == 3
    assert again.annotations[0].to_dict() == a.to_dict()
    # another model or prompt settings is another cache key
    assert AnnotationCache.key(episode(0, task), ann_.identity()) != AnnotationCache.key(
        episode(0, task), annotator(server, scene=False).identity())


def test_malformed_json_is_repaired_once(server):
    task = "stack the blocks"
    server.scripts[task] = [ok("Sure! The plan is: [\"Pick up the red cup\","), ok(PLAN), ok(alignment())]
    ann = annotator(server)
    run = annotate_episodes([episode(1, task)], ann)
    assert run.failures == {} and ann.stats["repairs"] == 1
    repair = server.for_task(task)[1]["body"]["messages"]
    assert repair[1] == {"role": "assistant", "content": "Sure! The plan is: [\"Pick up the red cup\","}
    assert "reply is not valid JSON" in repair[2]["content"]
    # still malformed after the repair round: the episode fails with the reason
    task2 = "open the drawer"
    server.scripts[task2] = [ok("not json"), ok({"plan": PLAN})]
    run = annotate_episodes([episode(2, task2)], annotator(server))
    assert "plan (call 1): reply is JSON dict, expected a list (after 1 repair round(s))" in run.failures[2]


def test_wrong_frame_ranges_validation_and_fuzzy_names(server):
    task = "wipe the table"
    gap = alignment()
    gap[1]["frame"] = [17, 29]
    fuzzy = alignment(names=["pick up the red cup.", "Place cup on the tray"])
    server.scripts[task] = [ok(PLAN), ok(gap), ok(fuzzy)]
    run = annotate_episodes([episode(3, task)], annotator(server))
    assert run.failures == {}
    assert [s.subtask for s in run.annotations[3].spans] == PLAN  # mapped back to the plan's strings
    fix = server.for_task(task)[2]["body"]["messages"][-1]["content"]
    assert "span 1 ('Place the cup on the tray', starts 17) leaves a gap after span 0 (ends 14)" in fix
    # out of the episode, then still not covering: fails, listing the problems
    task2 = "fold the towel"
    out = alignment()
    out[1]["frame"] = [15, 30]
    short = alignment()
    short[1]["frame"] = [15, 20]
    server.scripts[task2] = [ok(PLAN), ok(out), ok(short)]
    run = annotate_episodes([episode(4, task2)], annotator(server))
    assert "outside the episode [0, 29]" in server.for_task(task2)[2]["body"]["messages"][-1]["content"]
    assert "alignment (call 2): the last span ends at frame 20, not 29" in run.failures[4]
    # an unknown subtask name and non-integer frames are reported too
    task3 = "pour the water"
    bad = alignment()
    bad[0]["subtask"] = "Dance a jig"
    bad[1]["frame"] = [15.5, 29]
    server.scripts[task3] = [ok(PLAN), ok(bad), ok(bad)]
    run = annotate_episodes([episode(5, task3)], annotator(server))
    assert "item 0: subtask 'Dance a jig' is not one of the planned subtasks" in run.failures[5]
    assert "item 1 ('Place the cup on the tray'): 'frame' must be [start, end] integers" in run.failures[5]


def test_http_errors_backoff_and_resume(server, tmp_path):
    task = "close the lid"
    server.scripts[task] = [(429, "slow down", {"Retry-After": "0"}), (500, "boom", {}), ok(PLAN),
                            (503, "busy", {}), ok(alignment())]
    ann = annotator(server)
    run = annotate_episodes([episode(6, task)], ann)
    assert run.failures == {} and ann.stats["http_retries"] == 3 and ann.stats["requests"] == 5
    # 400 is not retried
    task2 = "press the button"
    server.scripts[task2] = [(400, "bad request: image too large", {}), ok(PLAN)]
    ann = annotator(server)
    run = annotate_episodes([episode(7, task2)], ann)
    assert "HTTP 400" in run.failures[7] and "image too large" in run.failures[7] and ann.stats["requests"] == 1
    # retries run out: the episode fails; a later run resumes it and reuses the cached episode
    cache = AnnotationCache(tmp_path / "cache")
    ta, tb = "lift the bowl", "hang the mug"
    server.scripts[ta] = [ok(PLAN), ok(alignment())]
    server.scripts[tb] = [(500, "down", {})] * 3
    eps = [episode(8, ta), episode(9, tb)]
    run = annotate_episodes(eps, annotator(server, max_retries=2), cache, concurrency=2)
    assert sorted(run.annotations) == [8] and "gave up after 3 attempts (HTTP 500" in run.failures[9]
    assert run.summary()["failures"] == {"9": run.failures[9]} and run.summary()["failed"] == 1
    server.scripts[tb] = [ok(PLAN), ok(alignment())]
    before = len(server.for_task(ta))
    run = annotate_episodes(eps, annotator(server), cache, concurrency=2)
    assert run.failures == {} and run.cache_hits == 1 and sorted(run.annotations) == [8, 9]
    assert len(server.for_task(ta)) == before  # the cached episode sent nothing


def test_annotate_cli_openai_on_a_dataset(server, tmp_path, capsys):
    """``vla-blocks annotate --annotator openai`` on a generated dataset: frames come from the reader, one episode
    fails (listed, exit 1), a re-run with the server fixed resumes from the cache."""
    pytest.importorskip("pyarrow")
    from vla_blocks.cli import main
    from vla_blocks.data import LeRobotDataset
    from vla_blocks.emcot import EmcotAnnotations
    root = tmp_path / "ds"
    cam = "observation.images.front"
    w = LeRobotDataset.create(root, fps=10, features={
        cam: {"dtype": "image", "shape": [16, 16, 3], "names": None},
        "observation.state": {"dtype": "float32", "shape": [4], "names": None}}, use_videos=False)
    tasks = ["put the red cup on the tray", "put the red cup in the sink"]
    for e, task in enumerate(tasks):
        ep = episode(e, task, T=20)
        for t in range(20):
            w.add_frame({cam: np.full((16, 16, 3), 10 * t + 40 * e, np.uint8),
                         "observation.state": ep.states[t].astype(np.float32), "task": task})
        w.save_episode()
    w.finalize()
    server.scripts[tasks[0]] = [ok(PLAN), ok(alignment(T=20, cut=12))]
    server.scripts[tasks[1]] = [ok(["Pick up the red cup"]), ok([{"subtask": "Pick up the red cup", "frame": [0, 30]}]),
                                ok([{"subtask": "Pick up the red cup", "frame": [0, 30]}])]
    args = ["annotate", str(root), "--state-layout", json.dumps({"left": {"xyz": [0, 1, 2], "gripper": 3}}),
            "--annotator", "openai", "--base-url", server.url, "--model", "m", "--max-images", "3", "--no-progress"]
    rc = main(args)
    cap = capsys.readouterr()
    assert rc == 1 and "annotate (openai): 1/2 episodes annotated, 0 from the cache, 1 failed" in cap.out
    assert "FAILED episode 1: alignment (call 2): span 0 ('Pick up the red cup') frames [0, 30] outside" in cap.err
    sent = [p for p in server.for_task(tasks[0])[0]["body"]["messages"][0]["content"] if p["type"] == "image_url"]
    pix = np.asarray(Image.open(io.BytesIO(base64.b64decode(sent[1]["image_url"]["url"].split(",", 1)[1]))))
    assert pix.shape == (16, 16, 3) and abs(float(pix.mean()) - 100) < 2  # frame 10 of episode 0 = 10·10
    ann = EmcotAnnotations(root)
    assert sorted(ann.episodes) == [0] and ann.failures["1"].startswith("alignment (call 2)")
    assert ann.frame(0, 5).subgoal_frame_index == 11 and ann.frame(0, 12).subgoal_frame_index == 19
    server.scripts[tasks[1]] = [ok(["Pick up the red cup"]), ok([{"subtask": "Pick up the red cup", "frame": [0, 19]}])]
    rc = main(args)
    assert rc == 0 and "2/2 episodes annotated, 1 from the cache, 0 failed" in capsys.readouterr().out
    assert sorted(EmcotAnnotations(root).episodes) == [0, 1]
