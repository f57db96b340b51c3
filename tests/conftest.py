import os

import torch

# Triton's interpreter runs chapter 9's kernels where there is no GPU. Triton reads the switch
# when it is first imported, and some tests import it early (through torch.compile): set it here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# PyTorch 2.13 on a CPU: in about one process in six, the first multi-threaded call of `exp` returns values far
# less accurate than later calls on the same input (seen as 5e-10 relative errors in float64 SSD outputs and
# 4e-5 in float32, where 1e-15 and 3e-7 are the norm). One warm-up call per dtype keeps it out of the checks.
for dtype in (torch.float32, torch.float64):
    torch.exp(torch.randn(1 << 20, dtype=dtype))
