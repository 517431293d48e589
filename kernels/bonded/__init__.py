"""Bonded terms over fixed index lists: harmonic bonds and angles, periodic torsions, and
Lennard-Jones + Coulomb exception pairs (scaled 1-4 interactions)."""
