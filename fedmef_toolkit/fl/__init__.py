"""Federated simulation: strategies on one engine and one client trainer."""
