"""Shared world models: RSSM (Dreamer), VAE + MDN-RNN (World Models), IRIS transformer."""
