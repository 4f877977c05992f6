"""oppu: One PEFT Per User. Personalize a shared LLM with one small PEFT module per user."""
__version__ = "0.1.0"
