"""Matching logic: pure Python at the centre, with the compiled twin picked by ``kernel``."""
