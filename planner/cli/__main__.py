"""`python -m planner.cli ...`: the `plan` command without its console script."""
from . import main

main()
