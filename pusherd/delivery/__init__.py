"""Outbound delivery: signing, retry policy, network guard and sender."""
