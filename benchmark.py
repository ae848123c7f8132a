#!/usr/bin/env python
"""The original plan's entry point: `python benchmark.py --size small --checkpoint checkpoints/best.pt
--output results.json`. Same as `ionllama bench`; see ionllama/eval/benchmark.py for every flag."""
import sys

from ionllama.eval.benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python benchmark.py"))
