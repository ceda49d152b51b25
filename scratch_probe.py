import time, torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
dev = "cuda"
def t(fn):
    torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); return (time.perf_counter() - t0) * 1e3
print("torch", torch.__version__, "cudnn sdp enabled:", torch.backends.cuda.cudnn_sdp_enabled(), "flash:", torch.backends.cuda.flash_sdp_enabled())
def attn(L, ctx=None):
    q = torch.randn(1, 32, L, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 32, L, 128, device=dev, dtype=torch.bfloat16)
    return lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True)
for label, ctx in (("default", None), ("flash", [SDPBackend.FLASH_ATTENTION]), ("cudnn", [SDPBackend.CUDNN_ATTENTION])):
    rows = []
    for L in range(1000 + 10 * len(label), 1000 + 10 * len(label) + 4):
        fn = attn(L)
        if ctx:
            with sdpa_kernel(ctx):
                a, b = t(fn), t(fn)
        else:
            a, b = t(fn), t(fn)
        rows.append(f"{L}:{a:.1f}/{b:.2f}")
    print("sdpa", label, " ".join(rows))
w = torch.randn(14336, 4096, device=dev, dtype=torch.bfloat16)
rows = []
for L in (261, 262, 263, 1051, 1052):
    x = torch.randn(L, 4096, device=dev, dtype=torch.bfloat16)
    fn = lambda: x @ w.t()
    rows.append(f"{L}:{t(fn):.2f}/{t(fn):.2f}")
print("gemm first/second ms", " ".join(rows))
