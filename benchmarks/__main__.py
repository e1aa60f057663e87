"""``python -m detserve.benchmarks [--quick | --full]`` (see benchmarks/README.md)."""

import sys

from detserve.benchmarks.run import main

sys.exit(main())
