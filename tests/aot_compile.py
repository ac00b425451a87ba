"""Compile every kernel ahead of time for Hopper (sm_90), no GPU needed.

Run without TRITON_INTERPRET (tests/test_kernels_compile.py starts it in a
subprocess): it catches what the interpreter cannot, such as type errors,
non-constexpr shapes or unsupported ops in compiled Triton.
"""

import sys

import triton
from triton.backends.compiler import GPUTarget

from cmiguard.kernels.cmi_loss import grad_kernel, stats_kernel
from cmiguard.kernels.decode import decode_write_kernel, fixup_kernel
from cmiguard.kernels.objective_backward import grad_factors_kernel, grad_u_kernel
from cmiguard.kernels.purify import purify_kernel
from cmiguard.kernels.tile import lse_kernel, project_kernel

INTS = {"N", "V", "v_chunk", "n_chunk", "lse_splits", "splits"}
STRIDES = {"stride_x", "stride_z", "stride_out", "stride_written"}


def signature(fn, constexprs, pointer_types):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointer_types.get(name, "*fp32")
        elif name in INTS:
            sig[name] = "i32"
        elif name in STRIDES:
            sig[name] = "i64"
        else:
            sig[name] = "fp32"
    return sig


def compile_kernel(fn, constexprs, pointer_types=None, num_warps=4):
    """``fn`` compiled for sm_90 with the launch options the kernels use."""
    src = triton.compiler.ASTSource(
        fn=fn, signature=signature(fn, constexprs, pointer_types or {}), constexprs=constexprs
    )
    options = {"enable_fp_fusion": False, "num_warps": num_warps}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compile_one(fn, constexprs, pointer_types=None):
    kernel = compile_kernel(fn, constexprs, pointer_types)
    assert "ptx" in kernel.asm and len(kernel.asm["ptx"]) > 1000
    return fn.__name__


def main():
    tile = {"BLOCK_N": 16, "BLOCK_V": 128, "BLOCK_R": 64, "DOT": "tf32x3"}
    flags = {"R": 64, "HAS_LOWRANK": True, "HAS_SCALE": True, "HAS_BIAS": True}
    half = {"x_ptr": "*bf16", "out_ptr": "*bf16"}
    guard = {"j_ptr": "*i64", "flags_ptr": "*i32"}
    half = half | {"flags_ptr": "*i32"}
    check = {"LOGPROBS": True, "CHECK": True}
    done = [
        compile_one(purify_kernel, {**flags, **tile, **check, "GUARD": False}, half),
        compile_one(purify_kernel, {**flags, **tile, **check, "GUARD": True}, guard),
        compile_one(
            purify_kernel,
            {
                **flags,
                **tile,
                "R": 0,
                "HAS_LOWRANK": False,
                "HAS_SCALE": False,
                "LOGPROBS": False,
                "GUARD": False,
                "CHECK": False,
            },
        ),
        compile_one(
            lse_kernel, {**flags, **tile, "NEED_T": True, "NEED_Z": True, "GUARD": False}, half
        ),
        compile_one(
            lse_kernel, {**flags, **tile, "NEED_T": False, "NEED_Z": False, "GUARD": True}, guard
        ),
        *(
            compile_one(
                project_kernel,
                {
                    "R": 256,
                    "CHECK": True,
                    "ARGMAX": True,
                    "CENTERED": centered,
                    "BLOCK_N": 32,
                    "BLOCK_V": 128,
                    "BLOCK_R": 64,
                    "DOT": "ieee",
                },
                {
                    "z_ptr": "*fp16",
                    "flags_ptr": "*i32",
                    "am_idx_ptr": "*i64",
                    "j_ptr": "*i64",
                    "count_ptr": "*i32",
                },
            )
            for centered in (False, True)
        ),
        compile_one(decode_write_kernel, {**flags, **tile, "GUARD": True}, {**half, **guard}),
    ]
    for logprobs in (True, False):
        consts = {"LOGPROBS": logprobs, "GUARD": True, "BLOCK_N": 16, "BLOCK_V": 128}
        done.append(compile_one(fixup_kernel, consts, {"out_ptr": "*bf16", "j_ptr": "*i64"}))
    ints = {"labels_ptr": "*i64", "group_ptr": "*i64"}
    for first, scatter, cross, kl in [(True, True, False, True), (False, False, True, True)]:
        consts = {**flags, **tile, "FIRST": first, "SCATTER": scatter, "CROSS": cross}
        done.append(compile_one(stats_kernel, {**consts, "NEED_KL": kl}, ints))
    consts = {**flags, **tile, "NEED_KL": True, "WRITE_GRAD": True}
    done.append(compile_one(grad_kernel, consts, {**ints, "x_ptr": "*bf16"}))
    fused = {**flags, **tile, "NEED_KL": True}
    factors = {**ints, "x_ptr": "*bf16", "b_ptr": "*bf16"}
    done.append(compile_one(grad_u_kernel, fused, factors))
    done.append(compile_one(grad_factors_kernel, {**fused, "CENTERED": True}, factors))
    print("compiled:", " ".join(done))


if __name__ == "__main__":
    sys.exit(main())
