"""Reporting: the results store (JSON), the recorder behind ``lora_bench``, provenance and tables."""
