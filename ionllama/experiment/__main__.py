"""`python -m ionllama.experiment` = `ionllama experiment`."""
import sys

from .cli import main

sys.exit(main())
