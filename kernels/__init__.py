"""Triton attention kernels for the Layout mask (imported as ``vla_blocks.kernels``)."""
