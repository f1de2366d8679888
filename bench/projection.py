"""Paper-scale projection: DataComp medium (128 M) and xlarge (12.8 B) from FLOP counts, byte counts and the
per-sample costs measured in this run. Every number that is an assumption (not measured here) is named as one.
"""

from __future__ import annotations

POOLS = {"medium": 128e6, "xlarge": 12.8e9}
TEACHER_DIM = 768  # ViT-L-14 (the paper's OpenAI teacher)
K, B = 10, 32768  # negCLIPLoss defaults (the paper's)
IMAGENET_TARGET_ROWS = 1000
# Assumptions (public spec sheets; not measured in this session: no GPU here)
H100_FP32_TFLOPS = 67.0  # SXM, non-tensor fp32: batch_lse multiplies in float32
H100_BF16_TFLOPS = 989.0  # SXM, dense bf16 tensor cores
H100_HBM_TBPS = 3.35
MATMUL_EFFICIENCY = 0.6  # assumed sustained fraction of peak for the tiled b×b×d products
EMBED_MFU = 0.4  # assumed model-FLOP utilisation of a ViT-L-14 forward in bf16
LSE_BYTES_PER_LOGIT = 20  # write the fp32 tile once, read it ~4 times (max and exp-sum for rows and columns)
# Reference: the reported cost of the reference implementation (ypwang61/negCLIPLoss_NormSim), not measured here:
# negCLIPLoss with K=10 on DataComp medium took ~35 min on 8 L40 GPUs.
REFERENCE_MEDIUM_MIN, REFERENCE_GPUS = 35.0, 8
L40_FP32_TFLOPS = 90.5
# ViT-L-14 FLOPs per sample: 2·params·tokens plus attention; image 304 M params × 257 tokens,
# text 123 M params × 77 tokens.
VIT_L14_FLOPS = 2 * 304e6 * 257 + 4 * 257**2 * 1024 * 24 + 2 * 123e6 * 77 + 4 * 77**2 * 768 * 12


def negclip_flops(n: float, k: int = K, b: int = B, d: int = TEACHER_DIM) -> float:
    """One b×b×d product per batch, N/b batches per partition, K partitions: 2·N·K·b·d."""
    return 2.0 * n * k * b * d


def fmt_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def lines(measured: dict, gpus: int = 8) -> list[str]:
    out: list[str] = []
    neg = measured.get("negclip")
    ns = measured.get("normsim", {})
    emb = measured.get("embed")
    floor_medium = negclip_flops(POOLS["medium"])
    out += [
        "### FLOP floor of negCLIPLoss",
        "",
        f"One b×b×d similarity product per batch, N/b batches per partition, K partitions: "
        f"2·N·K·b·d FLOPs (the row and column LSE reuse the same logits). For DataComp medium with the paper's "
        f"ViT-L-14 teacher (d = {TEACHER_DIM}), K = {K}, b = {B}: 2 × 1.28e8 × {K} × {B} × {TEACHER_DIM} = "
        f"**{floor_medium:.2e} FLOPs**; xlarge is 100× that, {negclip_flops(POOLS['xlarge']):.2e}. "
        f"The ~5.5e16 floor quoted with the reference cost corresponds to ~{5.5e16 / negclip_flops(1):.3g} samples, "
        "i.e. the share of the 128 M medium pool that typically downloads (~86 %); with all 128 M it is 6.4e16. "
        "On top come "
        f"2·N·K·b = {2 * POOLS['medium'] * K * B:.2e} exponentials (memory-bound, see below).",
        "",
        f"Reference: ~{REFERENCE_MEDIUM_MIN:.0f} min on {REFERENCE_GPUS} L40 = "
        f"{REFERENCE_MEDIUM_MIN * REFERENCE_GPUS / 60:.1f} GPU-hours. At the L40's fp32 peak "
        f"({L40_FP32_TFLOPS} TFLOPS) the floor is {fmt_time(floor_medium / (L40_FP32_TFLOPS * 1e12 * REFERENCE_GPUS))} "
        f"on {REFERENCE_GPUS} GPUs, so the reference runs at "
        f"~{100 * floor_medium / (L40_FP32_TFLOPS * 1e12 * REFERENCE_GPUS) / (REFERENCE_MEDIUM_MIN * 60):.0f} % of fp32 peak.",
        "",
    ]
    rows = []
    dim_scale = TEACHER_DIM / neg["dim"] if neg else 1.0  # gathered bytes grow with d
    for pool, n in POOLS.items():
        flops = negclip_flops(n)
        matmul_s = flops / (H100_FP32_TFLOPS * 1e12 * MATMUL_EFFICIENCY)
        lse_s = n * K * B * LSE_BYTES_PER_LOGIT / (H100_HBM_TBPS * 1e12)
        gather_bytes = 2 * n * K * TEACHER_DIM * 2
        gather_rows = 2 * n * K
        gather_s = gather_rows / neg["gather"]["rows_per_s"] if neg else float("nan")
        rows.append((pool, n, flops, matmul_s, lse_s, gather_bytes, gather_s))
    out += [
        f"### Projected `curate score --metric negclip` (K = {K}, b = {B}, d = {TEACHER_DIM}) on {gpus} H100",
        "",
        "Assumptions, not measured (no GPU in this session): H100 SXM fp32 peak "
        f"{H100_FP32_TFLOPS:g} TFLOPS at {MATMUL_EFFICIENCY:.0%} sustained for the products (batch_lse multiplies in "
        f"float32), HBM {H100_HBM_TBPS} TB/s with ~{LSE_BYTES_PER_LOGIT} bytes of traffic per logit for the two "
        "LSEs, and one gather thread per GPU reading rows at the rate measured here from page-cached `.npy` caches "
        f"({neg['gather']['rows_per_s']:,.0f} rows/s, {neg['gather']['mb_per_s']:.0f} MB/s at d = {neg['dim']}, "
        f"one thread; {TEACHER_DIM}-d rows are {TEACHER_DIM / neg['dim']:.2g}× larger)." if neg else "negclip was not measured in this run.",
        "",
        "| pool | N | FLOPs | products (GPU-time) | LSE (GPU-time) | rows gathered (bytes) | gather (thread-time) | "
        f"wall on {gpus} GPUs (max of the three / {gpus}) | reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pool, n, flops, matmul_s, lse_s, gather_bytes, gather_s in rows:
        wall = max(matmul_s + lse_s, gather_s * dim_scale) / gpus
        ref = f"~{REFERENCE_MEDIUM_MIN:.0f} min on 8 L40" if pool == "medium" else \
            f"~{fmt_time(REFERENCE_MEDIUM_MIN * 60 * 100)} on 8 L40 (×100, extrapolated)"
        out.append(f"| {pool} | {n:.3g} | {flops:.2e} | {fmt_time(matmul_s)} | {fmt_time(lse_s)} | "
                   f"{gather_bytes / 1e12:.1f} TB | {fmt_time(gather_s * dim_scale)} | {fmt_time(wall)} | {ref} |")
    out += [
        "",
        "The gather is the part to watch: every partition reads the whole pool's two fp16 columns in random "
        f"order ({rows[0][5] / K / 1e9:.0f} GB per partition for medium). That is memory-speed when the caches "
        "fit in the page cache (medium: "
        f"{POOLS['medium'] * TEACHER_DIM * 2 * 2 / 1e9:.0f} GB), and bound by random-read IOPS when they do not "
        "(xlarge: "
        f"{POOLS['xlarge'] * TEACHER_DIM * 2 * 2 / 1e12:.1f} TB; 1.5 KB reads at ~1 M IOPS per NVMe drive: "
        f"{fmt_time(2 * POOLS['xlarge'] * K / 1e6)} per drive). "
        "At xlarge scale the pool must be split over nodes, each holding its rows in RAM.",
        "",
    ]
    if ns:
        out += ["### Projected NormSim_∞ (ImageNet target, 1000 rows) and embedding", ""]
        cached = ns.get("normsim_inf", {})
        out.append("| step | per-sample cost measured here | medium (128 M) | xlarge (12.8 B) |")
        out.append("|---|---|---|---|")
        for label, r in (("normsim_inf from the fp16 cache, CPU core-time", cached),):
            if not r:
                continue
            per = min(r["stage_cpu_s"]) / r["n_rows"] * (TEACHER_DIM / r["dim"])
            out.append(f"| {label} (best CPU seconds; d scaled {r['dim']}→{TEACHER_DIM}) | {per * 1e6:.1f} µs | "
                       f"{fmt_time(per * POOLS['medium'])} | {fmt_time(per * POOLS['xlarge'])} |")
        flops = 2 * IMAGENET_TARGET_ROWS * TEACHER_DIM
        out.append(f"| normsim_inf products on 1 H100 (fp32 peak × {MATMUL_EFFICIENCY:.0%}, assumed) | "
                   f"{flops:.2g} FLOPs | {fmt_time(flops * POOLS['medium'] / (H100_FP32_TFLOPS * 1e12 * MATMUL_EFFICIENCY))} | "
                   f"{fmt_time(flops * POOLS['xlarge'] / (H100_FP32_TFLOPS * 1e12 * MATMUL_EFFICIENCY))} |")
        if emb:
            out.append(f"| embed ViT-L-14 forward on {gpus} H100 (bf16, {EMBED_MFU:.0%} MFU, assumed) | "
                       f"{VIT_L14_FLOPS:.2g} FLOPs | "
                       f"{fmt_time(VIT_L14_FLOPS * POOLS['medium'] / (H100_BF16_TFLOPS * 1e12 * EMBED_MFU * gpus))} | "
                       f"{fmt_time(VIT_L14_FLOPS * POOLS['xlarge'] / (H100_BF16_TFLOPS * 1e12 * EMBED_MFU * gpus))} |")
            if emb.get("decode_s_per_sample"):
                per = emb["decode_s_per_sample"]
                out.append(f"| JPEG decode + preprocess, CPU core-time (224 px synth JPEGs; real images are larger) | "
                           f"{per * 1e3:.1f} ms | {fmt_time(per * POOLS['medium'])} core-time | "
                           f"{fmt_time(per * POOLS['xlarge'])} core-time |")
        out += ["", "NormSim is I/O-bound at scale: the products are cheap, reading the embeddings is not. "
                "The stages read raw fp16 rows from the pool's `.npy` cache, built once from the Parquet lists "
                "(~1 µs of CPU per 512-d row to decode). "
                "Per-sample CPU costs parallelise over shards/ranks (`--rank/--world-size`).", ""]
    return out
