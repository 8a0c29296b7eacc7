"""Benchmarks print ratios against a baseline measured in the same run; `make bench` runs them."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
