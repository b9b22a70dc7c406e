"""Entry point for Clara pipelines: ``python register.py --agent NAME [--data JSON] [--input DIR]...``.

Kept in the image's working directory, as Clara's register-results image had it.
Same as the ``register-results`` console script.
"""
import sys

from clara_results.register import main

if __name__ == "__main__":
    sys.exit(main())
