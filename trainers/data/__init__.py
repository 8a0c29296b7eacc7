"""Datasets: sources, decoding, alignment cache, splits and class balance."""
