"""Atomic models (PDB or mmCIF, read with gemmi): positions, masses and widths of the atoms."""
from __future__ import annotations

import math

import numpy as np

from cryogs.errors import CryogsError

#: Å², used for atoms whose B-factor is missing or zero (σ = √(B/8π²) ≈ 0.5 Å).
DEFAULT_B_FACTOR = 20.0


class AtomSet:
    """Atoms of a model read with gemmi: positions (Å), mass (electrons, Z), B-factor width, residue id."""

    def __init__(self, xyz, mass, sigma, residue):
        self.xyz, self.mass, self.sigma, self.residue = xyz, mass, sigma, residue

    @classmethod
    def read(cls, path, *, centre: bool = True) -> AtomSet:
        """Read PDB or mmCIF. Waters are dropped; with ``centre`` the mass centre moves to the origin."""
        import gemmi

        try:
            st = gemmi.read_structure(str(path))
        except (RuntimeError, ValueError, OSError) as exc:
            raise CryogsError(f"{path}: cannot read atomic model: {exc}") from None
        st.remove_waters()
        xyz, z, b, res = [], [], [], []
        for ci, chain in enumerate(st[0]):
            for ri, residue in enumerate(chain):
                polymer = (info := gemmi.find_tabulated_residue(residue.name)) is not None and (
                    info.is_amino_acid() or info.is_nucleic_acid())
                for atom in residue:
                    xyz.append(atom.pos.tolist())
                    z.append(_element_number(atom, polymer))
                    b.append(atom.b_iso)
                    res.append(ci * 1_000_000 + ri)
        if not xyz:
            raise CryogsError(f"{path}: the atomic model has no atoms")
        xyz, z = np.asarray(xyz), np.asarray(z, dtype=np.float64)
        keep = z > 0
        xyz, z, b, res = xyz[keep], z[keep], np.asarray(b)[keep], np.asarray(res)[keep]
        if centre:
            xyz = xyz - (xyz * z[:, None]).sum(0) / z.sum()
        b = np.where(b > 0, b, DEFAULT_B_FACTOR)  # NMR and predicted models often carry B = 0
        return cls(xyz, z, np.sqrt(b / (8 * math.pi ** 2)), res)


def _element_number(atom, polymer: bool) -> int:
    """Atomic number; for polymer residues it comes from the atom name, since files with a blank
    element column (CHARMM-style PDBs) make gemmi guess CA as calcium and HG as mercury."""
    import gemmi

    if polymer:
        letter = atom.name.lstrip("0123456789")[:1]
        if letter in ("C", "N", "O", "S", "H", "P"):
            return gemmi.Element(letter).atomic_number
    return atom.element.atomic_number
