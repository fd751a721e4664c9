"""Paths of this repository, for tests that read its files or run its demo project."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
