"""Token buckets, the granularity at which configs are tuned and looked up, and the command that
tunes one (named in the runtime's warnings)."""

from __future__ import annotations

from flashmhf.codegen.spec import Spec

# The buckets a GPU model's cache is tuned at by default: decode (1, 16, 64), prefill chunks and small
# batches (256, 1024), training sizes (4096, 16384). Others are looked up at the nearest tuned one.
TUNED_BUCKETS = (1, 16, 64, 256, 1024, 4096, 16384)


def token_bucket(tokens: int) -> int:
    """Tokens rounded up to a power of two: the granularity at which configs are tuned and chosen."""
    return 1 if tokens <= 1 else 1 << (tokens - 1).bit_length()


def tune_command(spec: Spec, bucket: int) -> str:
    """The `flashmhf tune` command line that tunes ``spec`` at ``bucket``."""
    kv = f" --kv-heads {spec.n_kv_heads}" if spec.n_kv_heads != spec.n_heads else ""
    return (
        f"flashmhf tune --d-model {spec.d_model} --heads {spec.n_heads}{kv} --d-ff {spec.d_ff} "
        f"--experts {spec.n_experts} --dtype {spec.dtype} --kind {spec.kind} --tokens {bucket}"
    )
