from sglang.srt.layers.moe.moe_runner.base import BF16, NVFP4, MoeRunner, get_moe_runner, register_moe_runner

__all__ = ["BF16", "NVFP4", "MoeRunner", "get_moe_runner", "register_moe_runner"]
