"""`python -m trainer RECIPE.yaml`: what `plan train` launches on each process."""
import sys

from .train import main

sys.exit(main())
