"""Benchmarks and static checks: every claim in the README is a command here."""
