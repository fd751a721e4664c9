"""The log-linear explanation of a generative model: discretisation, step-wise gene selection, permutation tests,
patterns and label transfer (Hess, Hackenberg & Binder 2020; Treppner, Binder & Hess 2022).

    import scdgm.interpret
    explanation = scdgm.interpret.explain(model, adata, layer="counts", n_genes=8)
    explanation.selected_genes, explanation.p_values, explanation.transfer(new_cells), explanation.save("out")
"""
from scdgm.interpret.explain import ExplainSettings, Explanation, explain

__all__ = ["ExplainSettings", "Explanation", "explain"]
