"""Fake async-job providers in their documented shapes: each::labs predictions, Gemini Veo operations, the OpenAI Batch API.

    api = FakeJobsApi().start()        # a thread on loopback; api.base_url
    api.stop()

- each::labs (docs.eachlabs.ai): `POST /v1/prediction` -> `{"status": "success", "predictionID"}`;
  `GET /v1/prediction/{id}` -> `{id, status: starting|processing|success|failed|cancelled, input,
  output, logs, metrics: {predict_time, cost}, urls}`; `POST /v1/prediction/run` answers the
  finished prediction at once. Auth `X-API-Key`. The prediction bills `input.duration` seconds
  at `EACHLABS_PER_SECOND` (or 1 image at `EACHLABS_PER_IMAGE`), so `metrics.cost` is known to
  tests (a request header `x-fake-delay-s` slows any answer). `input.fake_outcome: failed` makes it fail (no cost); `input.fake_polls: N` keeps it
  `processing` for N polls (default 1).
- Gemini Veo (ai.google.dev video generation): `POST /v1beta/models/{m}:predictLongRunning` ->
  `{name: "models/{m}/operations/{id}"}`; `GET /v1beta/models/{m}/operations/{id}` -> the
  Operation: `{name, metadata, done: false}` for `fake_polls` polls (from
  `parameters.fake_polls`, default 1), then `{name, done: true, response: {"@type", generateVideoResponse:
  {generatedSamples: [{video: {uri}}] x sampleCount}}}`. Auth `x-goog-api-key`.
- OpenAI Batch API: `POST /v1/batches` -> a batch object `validating`; each `GET /v1/batches/{id}`
  moves it on (in_progress, then completed with an output_file_id); `GET /v1/files/{id}/content`
  -> JSON lines `{id, custom_id, response: {status_code, request_id, body}, error}`, the bodies
  chat completions with usage (`api.batches[id]["lines"]` are the bodies, for tests to price).
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

EACHLABS_KEY = "el-test-key"
GEMINI_KEY = "gm-test-key"
OPENAI_KEY = "sk-test-batch"
EACHLABS_PER_SECOND = Decimal("0.07")
EACHLABS_PER_IMAGE = Decimal("0.04")


class FakeJobsApi:
    def __init__(self) -> None:
        self.predictions: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeJobsApi:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                delay = float(headers.get("x-fake-delay-s") or 0)
                if delay:
                    time.sleep(delay)  # a slow provider (outside the lock: others are served meanwhile)
                with api.lock:
                    api.requests.append((method, self.path, headers))
                    status, body, ctype = api.handle(method, self.path, headers, raw)
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True, name="fake-jobs").start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def polls(self, path_part: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == "GET" and path_part in p)

    # --- routing ---------------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, bytes, str]:
        body = json.loads(raw) if raw else None
        if path.startswith("/v1/prediction"):
            if headers.get("x-api-key") != EACHLABS_KEY:
                return _json(401, {"status": "error", "message": "Invalid API key"})
            return self._eachlabs(method, path, body)
        if path.startswith("/v1beta/"):
            if headers.get("x-goog-api-key") != GEMINI_KEY:
                return _json(403, {"error": {"code": 403, "message": "API key not valid", "status": "PERMISSION_DENIED"}})
            return self._veo(method, path, body)
        if path.startswith("/v1/batches") or path.startswith("/v1/files/"):
            if headers.get("authorization") != f"Bearer {OPENAI_KEY}":
                return _json(401, {"error": {"message": "Incorrect API key", "type": "invalid_request_error",
                                             "param": None, "code": "invalid_api_key"}})
            return self._openai(method, path, body)
        return _json(404, {"error": "not found"})

    # --- each::labs ------------------------------------------------------------------------------

    def _eachlabs(self, method: str, path: str, body: Any) -> tuple[int, bytes, str]:
        if method == "POST" and path in ("/v1/prediction", "/v1/prediction/"):
            pid = uuid.uuid4().hex
            self.predictions[pid] = {"body": body, "polls": 0}
            return _json(200, {"status": "success", "predictionID": pid})
        if method == "POST" and path.rstrip("/") == "/v1/prediction/run":
            pid = uuid.uuid4().hex
            self.predictions[pid] = {"body": body, "polls": 99}
            return _json(200, self._prediction(pid))
        if method == "GET" and path.startswith("/v1/prediction/"):
            pid = path.rsplit("/", 1)[-1]
            if pid not in self.predictions:
                return _json(404, {"status": "error", "message": "Prediction not found"})
            self.predictions[pid]["polls"] += 1
            return _json(200, self._prediction(pid))
        return _json(404, {"status": "error", "message": "not found"})

    def _prediction(self, pid: str) -> dict[str, Any]:
        p = self.predictions[pid]
        inp = (p["body"] or {}).get("input") or {}
        doc: dict[str, Any] = {"id": pid, "input": inp, "logs": None,
                               "urls": {"get": f"/v1/prediction/{pid}", "cancel": f"/v1/prediction/{pid}/cancel"}}
        if p["polls"] <= int(inp.get("fake_polls", 1)):
            doc.update(status="starting" if p["polls"] == 0 else "processing", output=None, metrics={})
        elif inp.get("fake_outcome") == "failed":
            doc.update(status="failed", output=None, error="the model failed", metrics={"predict_time": 1.5})
        else:
            cost = eachlabs_cost(inp)
            doc.update(status="success", output=f"https://storage.eachlabs.ai/{pid}.mp4",
                       metrics={"predict_time": 42.0, "cost": float(cost)})
        return doc

    # --- Gemini Veo ------------------------------------------------------------------------------

    def _veo(self, method: str, path: str, body: Any) -> tuple[int, bytes, str]:
        if method == "POST" and path.endswith(":predictLongRunning"):
            model = path.removeprefix("/v1beta/models/").split(":")[0]
            name = f"models/{model}/operations/{uuid.uuid4().hex[:12]}"
            self.operations[name] = {"body": body, "polls": 0}
            return _json(200, {"name": name})
        name = path.removeprefix("/v1beta/")
        if method == "GET" and name in self.operations:
            op = self.operations[name]
            op["polls"] += 1
            params = (op["body"] or {}).get("parameters") or {}
            if op["polls"] <= int(params.get("fake_polls", 1)):
                return _json(200, {"name": name, "metadata": {"@type": "type.googleapis.com/google.ai.generativelanguage"
                                                                        ".v1beta.PredictLongRunningMetadata"}})
            samples = [{"video": {"uri": f"https://generativelanguage.googleapis.com/v1beta/files/{i}:download"}}
                       for i in range(int(params.get("sampleCount", 1)))]
            return _json(200, {"name": name, "done": True, "response": {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse",
                "generateVideoResponse": {"generatedSamples": samples}}})
        return _json(404, {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}})

    # --- OpenAI Batch API ------------------------------------------------------------------------

    def _openai(self, method: str, path: str, body: Any) -> tuple[int, bytes, str]:
        if method == "POST" and path == "/v1/batches":
            bid = f"batch_{uuid.uuid4().hex[:16]}"
            self.batches[bid] = {"body": body, "polls": 0, "lines": _batch_bodies(bid)}
            return _json(200, self._batch(bid))
        if method == "GET" and path.startswith("/v1/batches/"):
            bid = path.rsplit("/", 1)[-1]
            if bid not in self.batches:
                return _json(404, {"error": {"message": "No batch found", "type": "invalid_request_error"}})
            self.batches[bid]["polls"] += 1
            return _json(200, self._batch(bid))
        if method == "GET" and path.endswith("/content"):
            fid = path.split("/")[3]
            if fid in self.files:
                return 200, self.files[fid], "application/octet-stream"
        return _json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def _batch(self, bid: str) -> dict[str, Any]:
        b = self.batches[bid]
        polls, n = b["polls"], len(b["lines"])
        status = "validating" if polls == 0 else "in_progress" if polls == 1 else "completed"
        doc: dict[str, Any] = {
            "id": bid, "object": "batch", "endpoint": (b["body"] or {}).get("endpoint"), "errors": None,
            "input_file_id": (b["body"] or {}).get("input_file_id"), "completion_window": "24h", "status": status,
            "output_file_id": None, "error_file_id": None, "created_at": 1764640000,
            "request_counts": {"total": n, "completed": n if status == "completed" else 0, "failed": 0}}
        if status == "completed":
            fid = f"file-{bid[6:]}"
            doc["output_file_id"] = fid
            self.files[fid] = b"".join(json.dumps({
                "id": f"batch_req_{i}", "custom_id": f"request-{i}",
                "response": {"status_code": 200, "request_id": f"req_{i}", "body": line}, "error": None}).encode() + b"\n"
                for i, line in enumerate(b["lines"]))
        return doc


def eachlabs_cost(inp: dict[str, Any]) -> Decimal:
    if "duration" in inp:
        return Decimal(str(inp["duration"])) * EACHLABS_PER_SECOND
    return EACHLABS_PER_IMAGE * int(inp.get("num_images", 1))


def _batch_bodies(bid: str) -> list[dict[str, Any]]:
    """Three chat completions of different sizes, one with cached and reasoning tokens."""
    out = []
    for i, (prompt, cached, completion, reasoning) in enumerate([(120, 0, 30, 0), (2048, 1024, 400, 0),
                                                                 (900, 0, 1500, 1200)]):
        out.append({"id": f"chatcmpl-{bid}-{i}", "object": "chat.completion", "created": 1764640000,
                    "model": "gpt-4o-mini-2024-07-18",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                              "total_tokens": prompt + completion,
                              "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                              "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0}}})
    return out


def _json(status: int, doc: Any) -> tuple[int, bytes, str]:
    return status, json.dumps(doc).encode(), "application/json"
