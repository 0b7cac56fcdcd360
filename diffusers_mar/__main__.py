"""`python -m diffusers_mar` runs the `diffusers-mar` command line."""

import sys

from diffusers_mar.cli import main

sys.exit(main())
