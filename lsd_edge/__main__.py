"""`python -m lsd_edge ...` (also what `accelerate launch -m lsd_edge ...` runs)."""

from lsd_edge.cli.main import main

if __name__ == "__main__":
    main()
