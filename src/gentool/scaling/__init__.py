"""Scaling-law fitting: read run logs, fit power / Chinchilla / IsoFLOP / sigmoid laws with honest uncertainty."""
