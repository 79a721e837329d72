"""Benchmark MoLoRA against PEFT LoRA of the same active rank and the naive per-expert loop.

``python scripts/bench.py`` runs the full benchmark (layer on 2048-wide projections and a small-Llama training step;
minutes on a CPU); ``--quick`` runs tiny shapes in seconds; ``--help`` lists the options. Same as ``molora bench``.
"""

import sys

from molora.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
