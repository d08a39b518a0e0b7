"""hf_atm: model merging and ATM (Alternating Tuning and Merging) for the Hugging Face ecosystem."""

__version__ = "0.1.0"
