"""Training: optimizer and LR schedule, losses, data, the train step."""
