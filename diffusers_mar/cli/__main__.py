"""`python -m diffusers_mar.cli` runs the `diffusers-mar` command line (as `python -m diffusers_mar` does)."""

import sys

from diffusers_mar.cli import main

sys.exit(main())
