"""Agents: everything that acts or learns a policy, plus replay memory and the training loop."""
