def packed_nccl_broadcast_producer(iterator, group, src, post_iter_func, **kwargs):
    raise RuntimeError("fake vLLM: NCCL weight transfer needs CUDA and a real vLLM server")
