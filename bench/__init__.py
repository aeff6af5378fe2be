"""Benchmarks: POP Connector against a bare poplib+imaplib loop (and fetchmail) on a throwaway Dovecot.

Run ``python -m bench`` (``--help`` for sizes; ``--quick`` for a small smoke run). See docs/benchmarks.md.
Benchmarks are not tests: nothing here asserts a duration.
"""
