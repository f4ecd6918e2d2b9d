"""Print the MODELED GPU cost (HBM bytes, FLOPs, H100 roofline time) of fastpeft's fused kernels vs PEFT's op
sequence at LLaMA-7B shapes. A model, not a measurement: see ``fastpeft.bench.cost_model``."""

from fastpeft.bench.cost_model import main

if __name__ == "__main__":
    main()
