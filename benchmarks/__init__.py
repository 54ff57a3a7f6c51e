"""Benchmarks of ResiDual against zero-shot, LoRA, linear probing and full fine-tuning. Not imported by the library."""
