"""Nonbonded pair terms: Lennard-Jones and Coulomb (plain, reaction field, real-space Ewald)."""
