"""Gene sets from GMT files (one set a line: name, description, genes, tab-separated) and the bundled
immune marker sets used to read factor loadings of PBMC models."""
from __future__ import annotations

from pathlib import Path

from scdgm.errors import InputError

IMMUNE_GMT = Path(__file__).resolve().parent / "resources" / "immune.gmt"


def read_gmt(path: str | Path) -> dict[str, list[str]]:
    """Gene sets by name from a GMT file; duplicate genes within a set are dropped, order kept."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: gene-set file not found")
    sets: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) < 3 or not fields[0]:
            raise InputError(f"{path}:{number}: a GMT line needs a name, a description and at least one gene")
        if fields[0] in sets:
            raise InputError(f"{path}:{number}: gene set {fields[0]!r} appears twice")
        sets[fields[0]] = list(dict.fromkeys(g.strip() for g in fields[2:] if g.strip()))
    if not sets:
        raise InputError(f"{path}: no gene sets in the file")
    return sets


def immune_gene_sets() -> dict[str, list[str]]:
    """The bundled immune marker sets (T, CD4, CD8, B, NK, monocytes, DC, platelets, MHC II, IFN, ribosomal)."""
    return read_gmt(IMMUNE_GMT)
