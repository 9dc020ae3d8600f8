"""Preference and SFT data: readers, tokenization, the resumable loader, the synthetic task."""
