#!/usr/bin/env python
"""The original plan's entry point: `python train_cloud.py --size small --dataset fineweb ...`.
Same as `ionllama train ...`; see `python train_cloud.py --help`."""
import sys

from ionllama.train.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="train_cloud.py"))
