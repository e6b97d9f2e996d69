"""``python -m diffuse_cli`` (and ``torchrun -m diffuse_cli train ...``)."""

from diffuse_cli.cli import main

if __name__ == "__main__":
    main()
