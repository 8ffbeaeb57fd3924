"""An in-test vLLM server: the HTTP endpoints of `trl vllm-serve` (vLLM's OpenAI server in dev mode) that TRL 1.16's
client calls, served on localhost by a deterministic CPU engine (fake_engine), with its weight-transfer group on
gloo: the trainer is rank 0 and hosts the rendezvous store, this server's single worker is rank 1 and receives each
announced tensor by one broadcast from rank 0."""

import contextlib
import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import torch

from fake_vllm.fake_engine import Engine

COMPLETION_FIELDS = {
    "model", "prompt", "n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "logprobs",
    "return_token_ids", "return_tokens_as_token_ids", "structured_outputs", "seed",
}  # fmt: skip


class FakeVLLMServer:
    """Serves `model_path` at `url` until close(). `requests` records (method, path) of every call, `received` the
    names of each weight update.

    Example:
        >>> server = FakeVLLMServer(model_dir)
        >>> GRPOConfig(..., use_vllm=True, vllm_mode="server", vllm_server_base_url=server.url)
    """

    def __init__(self, model_path: str, *, seed: int = 0, logprobs_mode="processed_logprobs", backend="gloo"):
        self.model_path = model_path
        self.engine = Engine(model_path, seed=seed, processed_logprobs=logprobs_mode == "processed_logprobs")
        self.logprobs_mode = logprobs_mode
        self.backend = backend
        self.requests, self.received = [], []
        self.group = None
        self.pending = None  # the announced update: names, dtypes, shapes
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- endpoints: (status, JSON body) ----

    def get(self, path: str, query: str):
        if path == "/health":
            return 200, {}
        if path == "/v1/models":
            return 200, {"data": [{"id": self.model_path}]}
        if path == "/server_info":
            transfer = None if self.backend is None else {"backend": self.backend}
            config = {"model_config": {"logprobs_mode": self.logprobs_mode}, "weight_transfer_config": transfer}
            return 200, {"vllm_config": config}
        if path == "/get_world_size":
            return 200, {"world_size": 1}
        return 404, {"detail": "Not Found"}

    def post(self, path: str, body: dict):
        handlers = {
            "/v1/completions": self.completions,
            "/init_weight_transfer_engine": self.init_weight_transfer,
            "/start_weight_update": lambda body: {},
            "/update_weights": self.update_weights,
            "/finish_weight_update": lambda body: {},
            "/reset_prefix_cache": lambda body: {"success": True},
        }
        if path not in handlers:
            return 404, {"detail": "Not Found"}
        unknown = set(body) - COMPLETION_FIELDS if path == "/v1/completions" else set()
        if unknown:
            return 400, {"detail": f"unknown fields {sorted(unknown)}"}
        # the weight-transfer rendezvous blocks until the trainer joins: it must not hold the lock
        with self.lock if path != "/init_weight_transfer_engine" else contextlib.nullcontext():
            return 200, handlers[path](body)

    def completions(self, body: dict) -> dict:
        n, choices = body.get("n", 1), []
        for prompt in body["prompt"]:
            samples = self.engine.sample(
                prompt, n=n, temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0),
                top_k=body.get("top_k", 0), min_p=body.get("min_p", 0.0),
                repetition_penalty=body.get("repetition_penalty", 1.0), max_tokens=body.get("max_tokens", 16),
            )  # fmt: skip
            for sample in samples:
                tokens = [f"token_id:{t}" for t in sample.token_ids]
                logprobs = None
                if body.get("logprobs") is not None:
                    top = [{token: lp} for token, lp in zip(tokens, sample.logprobs)]
                    logprobs = {"tokens": tokens, "token_logprobs": sample.logprobs, "top_logprobs": top}
                choices.append({
                    "index": len(choices), "text": "", "prompt_token_ids": list(prompt),
                    "token_ids": sample.token_ids, "logprobs": logprobs, "finish_reason": sample.finish_reason,
                })  # fmt: skip
        return {"id": "cmpl-test", "object": "text_completion", "model": body["model"], "choices": choices}

    def init_weight_transfer(self, body: dict) -> dict:
        info = body["init_info"]
        store = torch.distributed.TCPStore(
            info["master_address"], info["master_port"], info["world_size"], is_master=False,
            timeout=timedelta(seconds=60),
        )  # fmt: skip
        self.group = torch.distributed.ProcessGroupGloo(
            store, info["rank_offset"], info["world_size"], timedelta(seconds=60)
        )
        return {}

    def update_weights(self, body: dict) -> dict:
        info = body["update_info"]
        names = []
        for name, dtype, shape in zip(info["names"], info["dtype_names"], info["shapes"]):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype))
            self.group.broadcast(tensor, 0).wait()
            self.engine.load_weights([(name, tensor)])
            names.append(name)
        self.received.append(names)
        return {}


def _handler(server: FakeVLLMServer):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            url = urlparse(self.path)
            server.requests.append(("GET", url.path))
            self._reply(*server.get(url.path, url.query))

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            server.requests.append(("POST", self.path))
            self._reply(*server.post(self.path, body))

        def _reply(self, status: int, body: dict):
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    return Handler
