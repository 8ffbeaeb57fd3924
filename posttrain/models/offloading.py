"""Activation offloading: the tensors autograd saves for backward wait in CPU memory, and come back when backward
needs them.

`activation_offloading=True` as TRL 1.16 defines it for SFT and DPO (after torchtune's OffloadActivations): during
a training step, every tensor autograd saves moves to the CPU (pinned memory when CUDA is available, copied on a side
stream so the copies overlap the forward), and is copied back to its device when backward unpacks it. Kept where
they are:

- parameters and buffers, and views of them (FSDP's and ZeRO-3's gathered parameters are still nn.Parameters);
- tensors smaller than `min_bytes` (1 KiB, as TRL: not worth the bandwidth);
- tensor subclasses (FP8 training tensors, DTensors, quantized weights);
- what the model's output head saves during its forward (its input is needed again as soon as backward starts), and
  whatever runs under `no_activation_offloading()`.

A tensor saved several times (one input read by the q, k and v projections) is copied once. With gradient
checkpointing, what is saved is each checkpointed layer's input: those go to the CPU, and a layer's recomputation
in backward saves nothing here. CPU tensors are copied too (as `torch.autograd.graph.save_on_cpu` does): a CPU-only
run pays a copy and gains nothing, and the CPU tests exercise the same path as a GPU run.
"""

import contextlib
import weakref

import torch

MIN_OFFLOAD_BYTES = 1024


def _keep(tensor):
    return tensor


@contextlib.contextmanager
def no_activation_offloading():
    """Inside, tensors saved for backward stay where they are, even under an active `ActivationOffloading`.

    For code whose saved tensors backward needs again at once (a fused output head).

    Example:
        >>> with ActivationOffloading(model):
        ...     hidden = model.model(input_ids).last_hidden_state
        ...     with no_activation_offloading():
        ...         loss = head_loss(hidden, model.lm_head.weight, labels)
        ...     loss.backward()
    """
    # saved-tensor hooks nest: the innermost pair is the one autograd calls
    with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        yield


class _CpuCopy:
    """One saved tensor's values in CPU memory, and how to rebuild it on its device."""

    __slots__ = ("__weakref__", "copied", "data", "device", "layout", "restored", "uses")

    def __init__(self, tensor: torch.Tensor, pin_memory: bool, stream):
        span = _storage_span(tensor)
        if span <= tensor.numel():
            # Dense (maybe permuted) or broadcast: copy the storage the view covers and keep its exact layout, so
            # an expanded tensor is never materialized
            source = tensor.as_strided((span,), (1,))
            self.layout = (tensor.size(), tensor.stride())
        else:
            # A view with gaps (a slice of a wider tensor): its elements only, restored contiguous
            source = tensor
            self.layout = None
        self.data = torch.empty(source.shape, dtype=source.dtype, pin_memory=pin_memory)
        self.device = tensor.device
        self.copied = _copy_to_cpu(self.data, source, stream)
        self.uses = 1
        self.restored = None

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def restore(self) -> torch.Tensor:
        # A tensor packed several times is copied back once while its unpacks follow one another; after the last
        # expected one (or on a second backward through a retained graph), each unpack copies again
        tensor = self.restored if self.restored is not None else self._to_device()
        self.uses -= 1
        self.restored = tensor if self.uses > 0 else None
        return tensor

    def _to_device(self) -> torch.Tensor:
        if self.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied)
        tensor = self.data.to(self.device, non_blocking=self.data.is_pinned())
        if self.layout is None:
            return tensor
        size, stride = self.layout
        return tensor.as_strided(size, stride, 0)


def _storage_span(tensor: torch.Tensor) -> int:
    """How many storage elements the view reaches, from its first element to its last (strides are never < 0)."""
    return 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))


def _copy_to_cpu(destination: torch.Tensor, source: torch.Tensor, stream) -> "torch.cuda.Event | None":
    """Copy source into destination. A copy into pinned memory runs asynchronously (on the side stream when given):
    the returned event marks its end, for the copy back to wait on whatever stream backward runs."""
    if not destination.is_pinned():
        destination.copy_(source)
        return None
    if stream is None:
        destination.copy_(source, non_blocking=True)
        return torch.cuda.current_stream(source.device).record_event()
    stream.wait_stream(torch.cuda.current_stream(source.device))
    with torch.cuda.stream(stream):
        destination.copy_(source, non_blocking=True)
    # The compute stream may free the source before the copy has read it: keep its memory from being handed out
    # again until the side stream's work queued so far is done
    source.record_stream(stream)
    return stream.record_event()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # DDP, DeepSpeed
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT


class ActivationOffloading:
    """Context manager: the tensors autograd saves inside it live on the CPU until backward needs them.

    Reusable: enter it around each training step (forward and backward). Backward may also run after the block: the
    saved tensors remember how to come back. Gradients are bitwise the same as without it.

    Args:
        model: the model being trained (wrapped in DDP, DeepSpeed or PEFT, or not): its parameters and buffers are
            never offloaded, and what its output head (`get_output_embeddings()`) saves stays on the device.
        min_bytes: tensors smaller than this stay where they are.
        pin_memory: copy into pinned CPU memory (default: when CUDA is available). Pinned copies run asynchronously.
        use_streams: copy CUDA tensors out on a side stream, overlapping the forward's compute (default: when CUDA is
            available; needs pinned memory).

    After each step, `offloaded_tensors` and `offloaded_bytes` count what went to the CPU during it.

    Example:
        >>> offloading = ActivationOffloading(model)
        >>> with offloading:
        ...     loss = model(input_ids=ids, labels=ids).loss
        ...     loss.backward()
        >>> offloading.offloaded_bytes > 0
        True
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        min_bytes: int = MIN_OFFLOAD_BYTES,
        pin_memory: bool | None = None,
        use_streams: bool | None = None,
    ):
        if min_bytes < 0:
            raise ValueError(f"min_bytes must be >= 0, got {min_bytes}")
        cuda = torch.cuda.is_available()
        self.pin_memory = cuda if pin_memory is None else pin_memory
        self.use_streams = self.pin_memory if use_streams is None else use_streams
        if self.use_streams and not (cuda and self.pin_memory):
            raise ValueError(
                f"use_streams=True needs CUDA and pinned memory (cuda available: {cuda}, pin_memory={self.pin_memory})"
            )
        self.model = model
        self.min_bytes = min_bytes
        self.offloaded_tensors = 0
        self.offloaded_bytes = 0
        self._streams = {}
        self._copies = {}
        self._model_storages = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._head_handles = []

    def __enter__(self):
        self.offloaded_tensors = self.offloaded_bytes = 0
        self._copies.clear()
        self._model_storages = _storage_pointers(self.model)
        self._pause_in_head()
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info):
        try:
            self._hooks.__exit__(*exc_info)
        finally:
            for handle in self._head_handles:
                handle.remove()
            self._head_handles.clear()
            self._copies.clear()

    def _pause_in_head(self):
        get_head = getattr(_unwrap(self.model), "get_output_embeddings", None)
        head = get_head() if get_head is not None else None
        if head is None:
            return
        active = []

        def pause(*_):
            context = no_activation_offloading()
            context.__enter__()
            active.append(context)

        def resume(*_):
            active.pop().__exit__(None, None, None)

        self._head_handles = [
            head.register_forward_pre_hook(pause),
            head.register_forward_hook(resume, always_call=True),
        ]

    def _offloadable(self, tensor: torch.Tensor) -> bool:
        if type(tensor) is not torch.Tensor or tensor.layout != torch.strided or tensor.is_meta:
            return False
        if tensor.numel() * tensor.element_size() < self.min_bytes:
            return False
        if isinstance(tensor._base, torch.nn.Parameter):
            return False
        return tensor.untyped_storage().data_ptr() not in self._model_storages

    def _pack(self, tensor: torch.Tensor):
        if not self._offloadable(tensor):
            return tensor
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride(),
               tensor.dtype, tensor.device, tensor._version)  # fmt: skip
        known = self._copies.get(key)
        copy = known() if known is not None else None
        if copy is not None:
            copy.uses += 1
            return copy
        copy = _CpuCopy(tensor, self.pin_memory and tensor.is_cuda, self._stream(tensor.device))
        entry = weakref.ref(copy)
        self._copies[key] = entry
        # The key names this tensor's memory only while the tensor lives: its address may hold another one later
        weakref.finalize(tensor, self._forget, key, entry)
        self.offloaded_tensors += 1
        self.offloaded_bytes += copy.nbytes
        return copy

    def _forget(self, key, entry):
        if self._copies.get(key) is entry:
            del self._copies[key]

    @staticmethod
    def _unpack(packed):
        return packed.restore() if isinstance(packed, _CpuCopy) else packed

    def _stream(self, device: torch.device):
        if not (self.use_streams and device.type == "cuda"):
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]


def _storage_pointers(model: torch.nn.Module) -> set[int]:
    # Subclass parameters (DTensor, quantized) are recognized by type when saved; their storage may not be readable
    tensors = (t for t in (*model.parameters(), *model.buffers()) if type(t) in (torch.Tensor, torch.nn.Parameter))
    return {t.untyped_storage().data_ptr() for t in tensors}
