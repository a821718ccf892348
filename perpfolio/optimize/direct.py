r"""Direct OSQP path for strategies that are plain quadratic programs.

A strategy whose objective terms all have a ``qp`` form (quadratic risk, linear downside,
expected return) and whose constraints all have ``qp_rows`` (budget, bounds, target return) is
the QP

.. math:: \min_w \tfrac12 w^\top P w + q^\top w \quad \text{s.t.}\quad l \le A w \le u

with a sparsity pattern that never changes: P is the full upper triangle, A has one dense row
per budget/target term and the identity for the bounds. :class:`DirectQP` sets OSQP up once and
per solve only updates the values (``Px``, ``q``, ``Ax``, ``l``, ``u``), warm-started from the
previous solution. It skips cvxpy's per-solve canonicalization (about 1 ms), which dominates
at these sizes. Terms and scaling are those of :mod:`perpfolio.optimize.terms`; the caller
verifies the solution against every constraint in original units, as for the cvxpy path.
"""

from __future__ import annotations

import numpy as np
import osqp
from scipy import sparse

from perpfolio.optimize.terms import SolveData

# Stop at 1e-6 and polish: a successful polish solves the KKT system of the detected active set,
# which is exact to ~1e-12; when polish fails, the same warm start is re-solved at 1e-9.
OSQP_SETTINGS = {"eps_abs": 1e-6, "eps_rel": 1e-6, "polish": True, "max_iter": 100_000,
                 "warm_starting": True, "verbose": False}
TIGHT_EPS = 1e-9
POLISH_SUCCEEDED = 1


class DirectQP:
    """One QP strategy set up once in OSQP for ``n`` assets; ``solve`` updates values only."""

    def __init__(self, objective_terms: list, constraints: list, n: int) -> None:
        self.objective_terms, self.constraints, self.n = objective_terms, constraints, n
        self.p_rows, self.p_cols = np.triu_indices(n)
        order = np.lexsort((self.p_rows, self.p_cols))  # CSC stores column by column
        self.p_rows, self.p_cols = self.p_rows[order], self.p_cols[order]
        self.solver: osqp.OSQP | None = None

    @staticmethod
    def supports(objective_terms: list, constraints: list) -> bool:
        return all(hasattr(t, "qp") for t in objective_terms) and all(hasattr(t, "qp_rows") for t in constraints)

    def matrices(self, data: SolveData, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Dense (P, q, A, l, u) of the scaled problem."""
        n = self.n
        P, q = np.zeros((n, n)), np.zeros(n)
        for term in self.objective_terms:
            p_term, q_term = term.qp(data, scale)
            if p_term is not None:
                P += p_term
            if q_term is not None:
                q += q_term
        rows = [term.qp_rows(data, scale, n) for term in self.constraints]
        A = np.vstack([r[0] for r in rows])
        return P, q, A, np.concatenate([r[1] for r in rows]), np.concatenate([r[2] for r in rows])

    def solve(self, data: SolveData, scale: float) -> tuple[np.ndarray | None, str]:
        """(weights, status) with status "optimal", "optimal_inaccurate", "infeasible",
        "unbounded" or "solver_error"."""
        P, q, A, lower, upper = self.matrices(data, scale)
        px = (P + P.T)[self.p_rows, self.p_cols] / 2
        if self.solver is None:
            # structural pattern: the bounds are the identity, every other row is dense (a zero
            # today may be non-zero at the next asof), so the pattern holds for every update
            mask = np.vstack([
                np.eye(self.n, dtype=bool) if getattr(t, "qp_pattern", "dense") == "identity"
                else np.ones((len(r[1]), self.n), dtype=bool)
                for t, r in zip(self.constraints, (t.qp_rows(data, scale, self.n) for t in self.constraints))
            ])
            self.a_cols, self.a_rows = np.nonzero(mask.T)
            self.solver = osqp.OSQP()
            self.solver.setup(
                sparse.csc_matrix((px, (self.p_rows, self.p_cols)), shape=(self.n, self.n)), q,
                sparse.csc_matrix((A[self.a_rows, self.a_cols], (self.a_rows, self.a_cols)), shape=A.shape),
                lower, upper, **OSQP_SETTINGS,
            )
        else:
            self.solver.update(Px=px, q=q, Ax=A[self.a_rows, self.a_cols], l=lower, u=upper)
        result = self.solver.solve(raise_error=False)
        if result.info.status == "solved" and result.info.status_polish != POLISH_SUCCEEDED:
            self.solver.update_settings(eps_abs=TIGHT_EPS, eps_rel=TIGHT_EPS)
            result = self.solver.solve(raise_error=False)
            self.solver.update_settings(eps_abs=OSQP_SETTINGS["eps_abs"], eps_rel=OSQP_SETTINGS["eps_rel"])
        status = result.info.status
        if status == "solved":
            return np.array(result.x, dtype=float), "optimal"
        if status == "solved inaccurate":
            return np.array(result.x, dtype=float), "optimal_inaccurate"
        if "primal infeasible" in status:
            return None, "infeasible"
        if "dual infeasible" in status:
            return None, "unbounded"
        return None, "solver_error"
