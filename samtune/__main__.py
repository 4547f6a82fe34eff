"""``python -m samtune``: the same as the ``samtune`` console script."""
from samtune.cli import main

if __name__ == "__main__":
    main()
