"""Run the `gradwatch` command line as `python -m keras_gradwatch`."""

import sys

from keras_gradwatch.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m keras_gradwatch"))
