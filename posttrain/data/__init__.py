"""Dataset preparation (tokenization, chat templates, packing) and collators, one module per trainer."""
