"""qlora: fine-tune large language models with QLoRA from the command line."""

import os

# OpenMP's default busy-waiting makes small CPU ops up to 40x slower when threads outnumber the cores
# a VM really gives us (measured on a 2-vCPU box: 128x256 matmuls 0.77 s with 1 thread, 32 s with 2).
# Passive waiting costs nothing on GPU boxes. Must be set before torch loads libgomp; users can override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
