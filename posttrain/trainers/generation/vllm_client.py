"""A client of the vLLM server TRL 1.16 trains against (`trl vllm-serve`, i.e. `VLLM_SERVER_DEV_MODE=1 vllm serve
MODEL --weight-transfer-config '{"backend": "nccl"}' --logprobs-mode processed_logprobs --max-logprobs -1`).

The protocol, as TRL's VLLMClient speaks it: GET /health, /v1/models, /server_info?config_format=json,
/get_world_size; POST /v1/completions (token-id prompts, return_token_ids, return_tokens_as_token_ids);
POST /init_weight_transfer_engine {"init_info"} while the trainer joins the weight-transfer group as its rank 0
(the server's workers are ranks 1..world size, the trainer hosts the rendezvous store on group_port);
POST /start_weight_update, /update_weights {"update_info": names, dtype_names, shapes} while the trainer broadcasts
the tensors over the group in that order, /finish_weight_update; POST /reset_prefix_cache.

The group's backend is the server's weight_transfer_config backend: "nccl" (vLLM's NCCL engine: the trainer side
runs vLLM's own helpers, so vLLM must be installed and the trainer on CUDA) or "gloo" (CPU tensors, one broadcast
per tensor; posttrain's tests serve it, vLLM itself has no gloo engine).
"""

import concurrent.futures
import contextlib
import json
import math
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import urlencode, urlparse

import torch

from posttrain._optional import require

NamedTensors = Iterator[tuple[str, torch.Tensor]]


class VLLMClient:
    """Talks to one vLLM server: generation over HTTP, weight updates over the weight-transfer group.

    Args:
        base_url: e.g. "http://10.0.0.2:8000" (the server's address as the trainer reaches it).
        group_port: TCP port of the weight-transfer group's rendezvous, opened by the trainer (TRL's
            vllm_group_port).
        connection_timeout: seconds to wait for the server to answer /health (TRL's vllm_server_timeout).

    Example:
        >>> client = VLLMClient("http://localhost:8000", group_port=51216, connection_timeout=240)
        >>> ids, logprobs = client.generate([[1, 2, 3]], n=4, max_tokens=16)
        >>> client.init_weight_transfer(torch.device("cuda", 0))
        >>> client.update_weights([("lm_head.weight", "bfloat16", [V, H])], iter([("lm_head.weight", w)]))
    """

    def __init__(self, base_url: str, *, group_port: int = 51216, connection_timeout: float = 240.0):
        parsed = urlparse(base_url)
        self.base_url = f"{parsed.scheme or 'http'}://{parsed.netloc}{parsed.path}".rstrip("/")
        self.host = parsed.hostname
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.group_port = group_port
        self.transport = None
        self._wait_for_server(connection_timeout)
        self.model = self._get("/v1/models")["data"][0]["id"]

    def _wait_for_server(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._get("/health", timeout=10)
                return
            except (OSError, RuntimeError):  # refused, reset, timed out, or not healthy yet
                pass
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"no vLLM server answered at {self.base_url}/health within vllm_server_timeout={timeout} s; start "
                    "one with `trl vllm-serve --model ...` (or vLLM's own server with the flags TRL documents)"
                )
            time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))

    def _get(self, path: str, *, params: dict | None = None, timeout: float | None = None) -> dict:
        query = f"?{urlencode(params)}" if params else ""
        return self._request(urllib.request.Request(f"{self.base_url}{path}{query}"), path, timeout)

    def _post(self, path: str, *, json_body: dict | None = None, timeout: float | None = None) -> dict:
        data = json.dumps(json_body or {}).encode()
        request = urllib.request.Request(
            f"{self.base_url}{path}", data=data, headers={"Content-Type": "application/json"}, method="POST"
        )
        return self._request(request, path, timeout)

    @staticmethod
    def _request(request, path: str, timeout: float | None) -> dict:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            if err.code == 404 and path != "/v1/completions":
                raise RuntimeError(
                    f"the vLLM server has no {path} endpoint: its weight-sync endpoints need VLLM_SERVER_DEV_MODE=1 "
                    "(which `trl vllm-serve` sets)"
                ) from err
            raise RuntimeError(f"vLLM server request {path} failed: {err.code} {err.read().decode()}") from err
        return json.loads(body) if body else {}

    def server_info(self) -> dict:
        """The server's resolved VllmConfig as JSON (model_config.logprobs_mode, weight_transfer_config, ...)."""
        return self._get("/server_info", params={"config_format": "json"})["vllm_config"]

    def world_size(self) -> int:
        """The server's workers: tensor_parallel_size x data_parallel_size."""
        return self._get("/get_world_size")["world_size"]

    def generate(
        self, prompt_ids: list[list[int]], *, n: int = 1, structured_outputs_regex: str | None = None,
        generation_kwargs: dict | None = None, **sampling,
    ) -> tuple[list[list[int]], list[list[float]] | None]:  # fmt: skip
        """n completions of each token-id prompt, prompt-major (the n of the first prompt, then the next), and the
        sampler's log-prob of each completion token (NaN where it has none), or None when the server returned none.

        `sampling` holds vLLM SamplingParams fields (temperature, top_p, top_k, min_p, repetition_penalty, max_tokens,
        logprobs); generation_kwargs are sent as given and override them.
        """
        payload = {
            "model": self.model, "prompt": prompt_ids, "n": n, "return_token_ids": True,
            "return_tokens_as_token_ids": True, **sampling,
        }  # fmt: skip
        if structured_outputs_regex is not None:
            payload["structured_outputs"] = {"regex": structured_outputs_regex}
        payload.update(generation_kwargs or {})
        choices = self._post("/v1/completions", json_body=payload)["choices"]
        completion_ids = [list(choice["token_ids"]) for choice in choices]
        if any(choice.get("logprobs") is None for choice in choices):
            return completion_ids, None
        logprobs = [
            [math.nan if lp is None else lp for lp in choice["logprobs"]["token_logprobs"]] for choice in choices
        ]
        return completion_ids, logprobs

    def init_weight_transfer(self, device: torch.device) -> None:
        """Open the weight-transfer group (the server joins it while this call waits for it)."""
        transfer_config = self.server_info().get("weight_transfer_config")
        backend = (transfer_config or {}).get("backend")
        if backend not in _TRANSPORTS:
            raise RuntimeError(
                f"the vLLM server at {self.base_url} has weight_transfer_config={transfer_config!r}: posttrain syncs "
                """weights over backend "nccl" (restart it with --weight-transfer-config '{"backend": "nccl"}') or "gloo\""""
            )
        init_info = {
            "master_address": _address_towards(self.host, self.port),
            "master_port": self.group_port,
            "rank_offset": 1,
            "world_size": self.world_size() + 1,
        }
        transport = _TRANSPORTS[backend]
        init_info.update(transport.init_info_extra())
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            joined = pool.submit(self._post, "/init_weight_transfer_engine", json_body={"init_info": init_info})
            self.transport = transport(init_info, device)
            joined.result()

    def update_weights(self, metadata: list[tuple[str, str, list[int]]], named_tensors: NamedTensors) -> None:
        """Replace the server's weights: `metadata` announces (name, dtype without "torch.", shape) of every tensor
        `named_tensors` then yields, in that order."""
        if self.transport is None:
            raise RuntimeError("init_weight_transfer() must open the weight-transfer group before update_weights()")
        names, dtypes, shapes = (list(column) for column in zip(*metadata))
        update_info = {"names": names, "dtype_names": dtypes, "shapes": shapes, **self.transport.update_info_extra()}
        self._post("/start_weight_update")
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            received = pool.submit(self._post, "/update_weights", json_body={"update_info": update_info})
            self.transport.send(named_tensors)
            received.result()
        self._post("/finish_weight_update")

    def reset_prefix_cache(self) -> None:
        self._post("/reset_prefix_cache")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


def _address_towards(host: str, port: int) -> str:
    """This machine's address on the route to host (what the server's workers connect back to), or VLLM_HOST_IP."""
    if os.environ.get("VLLM_HOST_IP"):
        return os.environ["VLLM_HOST_IP"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))  # UDP: no packet is sent, the kernel only picks the route
        return probe.getsockname()[0]


class _GlooTransport:
    """The trainer's rank 0 of a gloo group, hosting its rendezvous store; one broadcast per tensor, on the CPU."""

    def __init__(self, init_info: dict, device: torch.device):
        store = torch.distributed.TCPStore(
            init_info["master_address"], init_info["master_port"], init_info["world_size"], is_master=True,
            wait_for_workers=False, timeout=timedelta(minutes=5),
        )  # fmt: skip
        self.store = store
        self.group = torch.distributed.ProcessGroupGloo(store, 0, init_info["world_size"], timedelta(minutes=5))

    @staticmethod
    def init_info_extra() -> dict:
        return {"packed": False}

    @staticmethod
    def update_info_extra() -> dict:
        return {}

    def send(self, named_tensors: NamedTensors) -> None:
        for _, tensor in named_tensors:
            self.group.broadcast(tensor.detach().to("cpu").contiguous(), 0).wait()

    def close(self) -> None:
        self.group = self.store = None


class _NCCLTransport:
    """vLLM's NCCL weight-transfer engine, trainer side, through the helpers vLLM exposes for it: from vLLM 0.28 the
    rendezvous and packed broadcast of `vllm.distributed.weight_transfer` (packing announced at init), before it
    NCCLWeightTransferEngine's static trainer_init / trainer_send_weights (packing announced per update)."""

    def __init__(self, init_info: dict, device: torch.device):
        require("vllm", "vllm_mode='server' with the server's NCCL weight transfer")
        if device.type != "cuda":
            raise RuntimeError(
                f"the vLLM server syncs weights over NCCL, which needs the trainer on a CUDA device, got {device}"
            )
        if device.index is not None:
            torch.cuda.set_device(device)
        if _stateful_nccl_api():
            from vllm.distributed.weight_transfer.nccl_common import trainer_init

            self.group = trainer_init(init_info)
        else:
            from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

            self.group = NCCLWeightTransferEngine.trainer_init(init_info)

    @staticmethod
    def init_info_extra() -> dict:
        return {"packed": True} if _stateful_nccl_api() else {}

    @staticmethod
    def update_info_extra() -> dict:
        return {} if _stateful_nccl_api() else {"packed": True}

    def send(self, named_tensors: NamedTensors) -> None:
        if _stateful_nccl_api():
            from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

            packed_nccl_broadcast_producer(
                iterator=named_tensors, group=self.group, src=0, post_iter_func=lambda item: item[1]
            )
        else:
            from vllm.distributed.weight_transfer.nccl_engine import (
                NCCLTrainerSendWeightsArgs,
                NCCLWeightTransferEngine,
            )

            NCCLWeightTransferEngine.trainer_send_weights(
                iterator=named_tensors, trainer_args=NCCLTrainerSendWeightsArgs(group=self.group, packed=True)
            )

    def close(self) -> None:
        # the group keeps a socket to the server's workers, which would otherwise wait on it
        with contextlib.suppress(AttributeError):
            self.group.group.store = None
            self.group.group.socket = None
        self.group = None


def _stateful_nccl_api() -> bool:
    """vLLM >= 0.28 (vllm-project/vllm#50902) replaced NCCLWeightTransferEngine's static trainer methods."""
    import vllm
    from packaging.version import Version

    return Version(Version(vllm.__version__).base_version) >= Version("0.28.0")


_TRANSPORTS = {"nccl": _NCCLTransport, "gloo": _GlooTransport}
