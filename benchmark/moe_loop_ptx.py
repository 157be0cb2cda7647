"""Instruction mix of the NVFP4 MoE GEMM kernels' K loop, from their sm_90 PTX or SASS (no GPU needed).

    TRITON_INTERPRET=0 python benchmark/moe_loop_ptx.py [--gemm 1|2] [--block-n 64 --block-k 64 --warps 4 --stages 4]
        [--swap] [--sass]

Compiles the grouped GEMM kernel at a tile of the tuned tables (default: M = 16-64's 64x64, 4 warps,
4 stages, 16-token blocks) with the divisibility Triton sees at the real shapes (pointers and the
strides / sizes of E=128 H=2816 I=704 are multiples of 16), then counts the PTX instructions of the
innermost loop (one K step of one thread) and the sizes of its asynchronous copies. --sass counts the
machine code instead (Triton's bundled nvdisasm; the longest loop, which is the main K loop) and
prints the registers per thread (cuobjdump): register copies (IMAD.MOV) and redundant work across
warps show only there. Lets a change to the decode, the loads or the tile be judged on the CPU
before it is timed on the GPU.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

from sglang.srt.layers.moe.fused_moe_triton import kernels
from sm90_build import build_sm90

# Pointer types (the other runtime arguments are i32); at the real shapes the JIT also finds the
# sizes and K slice below to be multiples of 16 (the token-dependent counts are not specialised).
_POINTERS = {
    1: dict(x_ptr="*bf16", w_ptr="*i32", tbl_ptr="*u8", gs_ptr="*fp32", h_ptr="*bf16", ws_ptr="*fp32"),
    2: dict(h_ptr="*bf16", w_ptr="*i32", tbl_ptr="*u8", gs_ptr="*fp32", topk_w_ptr="*fp32", out_ptr="*bf16"),
}
_ROW_POINTERS = dict(sorted_ids_ptr="*i32", block_expert_ptr="*i32", num_padded_ptr="*i32")
_DIVISIBLE = ("N", "K", "k_split")


def loop_body(ptx: str) -> str:
    """The PTX between the innermost loop's header label and its back branch."""
    m = re.search(r"Inner Loop Header.*?\n(.*?)\n\s*@%p\d+ bra\s+\$L__BB\d+_\d+;", ptx, re.S)
    if m is None:
        raise ValueError("no loop found in the PTX")
    return m.group(1)


def _nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_loop(cubin: bytes) -> tuple[collections.Counter, int]:
    """Opcode counts of the longest loop in the cubin's SASS, and the kernel's registers per thread."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_nvidia_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^\s*(\.L_x_\d+):", line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA `\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i]  # fmt: skip
    if not loops:
        raise ValueError("no loop found in the SASS")
    start, end = max(loops, key=lambda se: se[1] - se[0])
    ops = collections.Counter(m.group(1) for line in lines[start : end + 1]
                              if (m := re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)))  # fmt: skip
    return ops, int(re.search(r"REG:(\d+)", usage).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gemm", type=int, choices=(1, 2), default=1)
    ap.add_argument("--block-m", type=int, default=16)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--block-k", type=int, default=64)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--swap", action="store_true", help="weights on the MMA's M side (always so from 64-token blocks)")
    ap.add_argument("--sass", action="store_true", help="count the SASS loop instead of the PTX one")
    args = ap.parse_args()
    consts = dict(BM=args.block_m, BN=args.block_n, BK=args.block_k, W_FP4=True, SWAP_AB=args.swap or args.block_m >= 64,
                  GROUP_N=1, HAS_GS=True, PDL=True)  # fmt: skip
    if args.gemm == 1:
        consts.update(ACT=0, SPLIT_K=1, FUSE_ACT=True)
    fn = kernels.moe_gemm1_kernel if args.gemm == 1 else kernels.moe_gemm2_kernel
    types = {**_POINTERS[args.gemm], **_ROW_POINTERS}
    compiled = build_sm90(fn, types, consts, args.warps, args.stages, _DIVISIBLE)
    if args.sass:
        ops, regs = sass_loop(compiled.asm["cubin"])
        print(f"GEMM{args.gemm} {consts} warps {args.warps} stages {args.stages}: {regs} registers, shared memory "
              f"{compiled.metadata.shared} B, {sum(ops.values())} SASS instructions per thread and K step")  # fmt: skip
        for op, n in ops.most_common(20):
            print(f"{n:5d}  {op}")
        return
    body = loop_body(compiled.asm["ptx"])
    ops = collections.Counter(re.findall(r"^\s*(?:@!?%p\d+\s+)?([a-z]+(?:\.[a-z0-9]+)*)", body, re.M))
    copies = collections.Counter(re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], (0x[0-9a-f]+)", body))
    print(f"GEMM{args.gemm} {consts} warps {args.warps} stages {args.stages}: shared memory {compiled.metadata.shared} B, "
          f"{sum(ops.values())} PTX instructions per thread and K step")  # fmt: skip
    print("async copies by size (bytes):", {int(k, 16): v for k, v in sorted(copies.items())})
    for op, n in ops.most_common(20):
        print(f"{n:5d}  {op}")


if __name__ == "__main__":
    main()
