"""Compiled hot path of fastmatch (Cython). Import through ``server.matching.kernel``."""
