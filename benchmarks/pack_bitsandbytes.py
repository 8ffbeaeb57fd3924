"""python -m benchmarks.pack_bitsandbytes [DIR]: a wheel of the installed bitsandbytes holding only the CUDA 13.0
library (what the GPU image's torch cu130 loads), written to DIR (default .whl, what the device call carries).

The GPU image has no bitsandbytes and its wheel (~100 MB, one library per CUDA version and ROCm/XPU build) is over the
device call's 64 MiB carry limit; this one is ~5 MB. Its library needs libcudart, libcublas and libcublasLt 13, which
torch cu130 loads when imported. Without it, benchmarks/memory.py drops its QLoRA variants with a note.
"""

import base64
import hashlib
import sys
import zipfile
from importlib import metadata
from pathlib import Path

KEEP_LIBRARY = "libbitsandbytes_cuda130.so"


def _keep(path: str) -> bool:
    name = Path(path).name
    return not (name.startswith("libbitsandbytes_") and name != KEEP_LIBRARY) and "__pycache__" not in path


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def pack(out_dir: Path) -> Path:
    dist = metadata.distribution("bitsandbytes")
    root = Path(dist.locate_file(""))
    info = f"bitsandbytes-{dist.version}.dist-info"
    tag = next(line.split(": ", 1)[1] for line in dist.read_text("WHEEL").splitlines() if line.startswith("Tag: "))
    files = [str(f) for f in dist.files if _keep(str(f)) and not str(f).startswith(f"{info}/")]
    if not any(Path(f).name == KEEP_LIBRARY for f in files):
        raise FileNotFoundError(f"the installed bitsandbytes {dist.version} has no {KEEP_LIBRARY}")
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"bitsandbytes-{dist.version}-{tag}.whl"
    record = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        entries = [(f, (root / f).read_bytes()) for f in files]
        entries += [(f"{info}/{name}", dist.read_text(name).encode()) for name in ("METADATA", "WHEEL")]
        for name, data in entries:
            archive.writestr(name, data)
            record.append(_record_line(name, data))
        archive.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")
    return wheel


if __name__ == "__main__":
    path = pack(Path(sys.argv[1] if len(sys.argv) > 1 else ".whl"))
    print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")
