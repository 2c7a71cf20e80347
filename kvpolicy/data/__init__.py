"""Data: real text for prompts (essays, dialogues) and loaders for the paper's hub datasets."""
