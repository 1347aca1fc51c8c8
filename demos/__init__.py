"""Demos of keras_gradwatch: the vanishing- and exploding-gradient experiment.

Run `python -m demos --help` for the command line.
"""
