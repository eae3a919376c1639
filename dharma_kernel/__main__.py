"""``python -m dharma_kernel``: the same as the ``dharma`` command."""

from .cli import main

if __name__ == "__main__":
    main()
