def trainer_init(init_info):
    raise RuntimeError("fake vLLM: NCCL weight transfer needs CUDA and a real vLLM server")
