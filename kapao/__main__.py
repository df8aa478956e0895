"""`python -m kapao …` (also what `torchrun -m kapao train …` runs)."""
from kapao.cli.main import main

if __name__ == "__main__":
    main()
