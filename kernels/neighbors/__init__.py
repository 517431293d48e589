"""Neighbor lists: cell lists for periodic (triclinic, small cells), mixed-pbc and batched
systems."""
