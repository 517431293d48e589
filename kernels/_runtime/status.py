"""The status word of a capacity-mode list: int32 [2] on the list's device, (flags, number of
rebuilds). Kernels set flags with atomic ORs and never read them back to the host; the owner of
the list reads them at a natural synchronisation point (or asynchronously, without waiting).

Flags are bits so that one relaxed atomic OR sets each, whatever the order programs run in.
"""

REBUILD = 1  # rebuild the list in this step (set by the Verlet check or by the owner)
OVERFLOW = 2  # more pairs (or tiles) than the capacity: the list is incomplete; kept until the
# owner rebuilds with a larger capacity
NONFINITE = 4  # a position was NaN or inf at the last check
BAD_CELL = 8  # the cell no longer suits the list's layout (cluster path: box too small)
INVALID = OVERFLOW | NONFINITE | BAD_CELL  # results computed from the list are meaningless

NAMES = {OVERFLOW: "overflow", NONFINITE: "non-finite positions", BAD_CELL: "cell unsuited"}
