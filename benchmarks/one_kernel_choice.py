"""Which forward the layer op runs on a GPU model, from the tuning caches in effect (no GPU needed):
for every preset, dtype and tuned token bucket, the one-kernel forward's time (``norm_router_core``
or ``router_core``) beside the norm/router kind's plus the core's forward kind's, and the choice
``layer_op`` makes from them (see ``layer_op.FUSED_MAX_TOKENS``).

    python -m benchmarks.one_kernel_choice [--device nvidia-h200] [--capability 9.0]
"""

from __future__ import annotations

from unittest import mock

import torch
import triton

from benchmarks.common import argument_parser
from flashmhf.cache.device import DeviceInfo
from flashmhf.codegen.arch import arch_for_capability
from flashmhf_runtime import layer_op, op
from flashmhf_runtime.presets import PRESETS

BUCKETS = (1, 16, 64, 256, 1024)


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("benchmarks.one_kernel_choice", __doc__)
    parser.add_argument("--device", default="nvidia-h200", help="GPU model name as the cache keys it")
    parser.add_argument("--capability", default="9.0", help="its compute capability")
    args = parser.parse_args(argv)
    info = DeviceInfo(args.device, args.capability, triton.__version__, "")
    arch = arch_for_capability(tuple(int(x) for x in args.capability.split(".")))
    device = torch.device("cuda", 0)  # a key only: nothing runs on it
    print("| preset | dtype | T | one kernel ms | norm/router + core ms (core kind) | runs |")
    print("|---|---|---|---|---|---|")
    # The op's own choices, with this GPU model's architecture and cache rows standing in for a device.
    with mock.patch.object(op, "arch_of", lambda device: arch), mock.patch.object(op, "device_info", lambda i: info):
        for name, p in PRESETS.items():
            for dtype in ("bf16", "fp16"):
                shape = (*p.shape, dtype)
                fused = "norm_router_core" if p.head_norm else "router_core"
                prologue = "norm_router" if p.head_norm else "router"
                for bucket in BUCKETS:
                    core = op.kind_for(op.FORWARD, shape, bucket, device)
                    one = op.tuned_ms(fused, shape, bucket, 0)
                    two = [op.tuned_ms(k, shape, bucket, 0) for k in (prologue, core)]
                    chosen = layer_op._fused_kind(p.head_norm, shape, bucket, device)
                    two_text = "–" if None in two else f"{sum(two):.4f} ({core})"
                    print(f"| {name} | {dtype} | {bucket} | {'–' if one is None else f'{one:.4f}'} | {two_text} | "
                          f"{'one kernel' if chosen else 'two steps'} |")


if __name__ == "__main__":
    main()
