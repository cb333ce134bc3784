"""bdexp: a config-driven experiment runner for backdoor research on image classifiers."""

__version__ = "0.1.0"
