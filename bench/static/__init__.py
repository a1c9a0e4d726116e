"""Static analysis of the compiled kernels, and the performance model: tooling, not run time.

    report.py       the static GPU report of the Triton kernels (docs/gpu-static-report.{md,csv})
    aot_check.py    compiles any Triton kernel variant for a GPU target without a GPU
    roofline.py     the roofline model of the Triton passes (docs/roofline.md)
    cuda_report.py  registers, stack and spills of the csrc CUDA kernel (docs/cuda-static-report.md)

Nothing in fastalpha imports these: they run from a checkout (`python -m bench.static.report`),
beside the benchmarks, and a wheel does not carry them.
"""
