"""`python -m planner ...`: the `plan` command without its console script."""
from .cli import main

main()
