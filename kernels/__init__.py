r"""The Triton kernels of the α-CL family: every `@triton.jit` function of the `triton` backend.

For Z (M × D) they compute, tile by tile and without any M × M buffer, the per-anchor losses
and the gradient ∂(Σ_i w_i loss_i)/∂Z of every rule (fastalpha.dispatch has the contract):

    row_pass.py      online row statistics (flash-attention forward with Q = K = V = Z),
                     loss, A_i, row side Σ_j β_ij and βZ
    column_pass.py   column side Σ_i β_ij and βᵀZ (flash-attention's dK/dV loop)
    sparsemax.py     exact sparsemax threshold of `square` (Michelot's iteration)
    tiles.py         Gram tile, masks, log-weights, α and β of a tile

This folder sits at the top of a checkout beside csrc/ (the C++ and CUDA kernels) and is
imported as `fastalpha.kernels`: a wheel carries it as that subpackage (setup.py), and in a
checkout fastalpha/__init__.py attaches it under that name. It imports only triton, never
fastalpha: the launcher (fastalpha.backends.triton.launch) imports the kernels, not the other
way round. Importing this package itself imports nothing, so that fastalpha imports without
triton.
"""
