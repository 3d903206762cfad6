"""`python -m deepseek_vl2.batch`: see cli.py."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
