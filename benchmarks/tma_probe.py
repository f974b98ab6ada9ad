"""Does the TMA tile-space option compile and compute the right thing on this GPU? Exit 0 if so.

gpu_check.sh runs this first and sets CLO_TMA=0 for every later step when it fails, so a Triton or driver
without working tensor descriptors costs the TMA configs only, not the whole check.
"""

import sys

import common  # noqa: F401  (machine facts; imported first as every benchmark does)
import torch
import triton

import clo_kernels.launch as launch
from clo_fast.ops import linear_logprobs


def main() -> int:
    if not launch.tma_available():
        print("TMA not available here")
        return 1
    launch.set_tma(True)  # the probe is about the TMA tiles, whatever CLO_TMA says
    tma = [c for c in launch.gpu_shapes() if c[5]]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(777, 512, device="cuda", generator=g).bfloat16()
    w = (torch.randn(32000, 512, device="cuda", generator=g) / 512**0.5).bfloat16()
    y = torch.randint(0, 32000, (777,), device="cuda", generator=g)
    ref = torch.log_softmax(x.double() @ w.double().T, -1).gather(1, y[:, None])[:, 0]
    for c in tma:
        cfg = launch._cfg(*c)
        launch._kernels = {
            name: (triton.autotune([cfg], key=[])(k),) * 2
            for name, k in (("fwd", launch._partial_lse_kernel), ("grad", launch._logit_grad_kernel))
        }
        for trains in (False, True):
            xg = x.clone().requires_grad_(True)
            out = linear_logprobs(xg, w.clone().requires_grad_(trains), y, impl="triton")
            out.sum().backward()
            err = float((out.double() - ref).norm() / ref.norm())
            print(c, "head trains" if trains else "frozen", f"rel err {err:.2e}")
            if not err < 1e-4 or not torch.isfinite(xg.grad).all():
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
