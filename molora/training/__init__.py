"""Training integrations: YAML recipes and TRL fine-tuning (``molora sft``), evaluation, logging callbacks."""
