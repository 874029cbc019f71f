"""``surgery approximate``: how well each structured mixer family approximates a teacher's attention.

MOHAWK's Table 3 (Bick et al. 2024, arXiv 2408.10189) on any teacher: :mod:`.fit` fits each family to
attention matrices, :mod:`.study` captures them from the teacher on held-out text and writes the
tables and the plot.
"""

from .fit import FAMILIES, Fit, fit_all

__all__ = ["FAMILIES", "Fit", "fit_all"]
