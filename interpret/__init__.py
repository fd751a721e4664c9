"""The log-linear explanation of a generative model: discretisation, step-wise gene selection, permutation tests,
patterns and label transfer (Hess, Hackenberg & Binder 2020; Treppner, Binder & Hess 2022)."""
